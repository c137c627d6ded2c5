"""The lab's entry point: compose conf/ with Hydra, check the config, run the task.

    python run.py model=vae disc.norm_type=spectral_group
    python run.py -m model.lr=1e-4,4.5e-6 disc.norm_type=spectral_group,spectral,batch,none
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm_lab.config.schema import register_configs
from ldm_lab.config.validate import ConfigError, check_config, check_group_choices, check_task_options

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ldm_lab.tasks import run

    check_config(cfg)
    run(cfg)


if __name__ == "__main__":
    try:
        conf_dir = Path(__file__).resolve().parent / "conf"
        check_group_choices(sys.argv[1:], conf_dir)
        check_task_options(sys.argv[1:], conf_dir)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    main()
