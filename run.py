"""The lab's entry point: compose conf/ with Hydra, run the task.

    python run.py model=vae disc.norm_type=spectral_group
    python run.py -m model.lr=1e-4,4.5e-6 disc.norm_type=spectral_group,spectral,batch,none
"""

import hydra
from omegaconf import DictConfig

from ldm_lab.schema import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ldm_lab.tasks import run

    run(cfg)


if __name__ == "__main__":
    main()
