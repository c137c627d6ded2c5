"""The lab's entry point: compose conf/ with Hydra, check the config, run the task.

    python run.py model=vae disc.norm_type=spectral_group
    python run.py -m model.lr=1e-4,4.5e-6 disc.norm_type=spectral_group,spectral,batch,none

An error the user caused and can fix (a bad value, a missing or wrong-kind file; ldm_lab/core/errors.py)
is one ``error: ...`` line and exit status 2; ``HYDRA_FULL_ERROR=1`` shows its traceback. A run stopped by
SIGTERM or SIGINT checkpoints and exits 128 + the signal (ldm_lab/callbacks/stop_signals.py).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm_lab.callbacks.stop_signals import RunStopped
from ldm_lab.config.schema import register_configs
from ldm_lab.config.validate import check_config, check_group_choices, check_moved_keys, check_task_options
from ldm_lab.core.errors import user_error

register_configs()


def exit_with_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ldm_lab.tasks import run

    try:
        check_config(cfg)
        run(cfg)
    except RunStopped as stopped:  # SIGTERM or SIGINT: a checkpoint was written, the resume command logged
        sys.exit(stopped.exit_code)
    except Exception as error:
        cause = user_error(error)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        exit_with_error(str(cause))


if __name__ == "__main__":
    conf_dir = Path(__file__).resolve().parent / "conf"
    try:
        check_group_choices(sys.argv[1:], conf_dir)
        check_task_options(sys.argv[1:], conf_dir)
        check_moved_keys(sys.argv[1:])
    except Exception as error:
        if user_error(error) is None:
            raise
        exit_with_error(str(error))
    main()
