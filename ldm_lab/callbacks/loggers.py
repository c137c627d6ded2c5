"""Loggers beside TensorBoard (conf/logger/): Weights & Biases, built so that a resumed run continues its W&B
run, and the image grids sent to every logger that takes images."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from ldm_lab.core.errors import ConfigError


def wandb_logger(save_dir: str, project: str, name: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger whose run id comes from the run folder: a resume into the same folder (ckpt_path=...
    hydra.run.dir=<run>) continues the same W&B run. Offline with WANDB_MODE=offline."""
    if find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb (or pip install -e '.[wandb]'), "
                          "or log with logger=tensorboard or logger=csv")
    folder = Path(save_dir).resolve()
    run_id = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    return WandbLogger(save_dir=str(folder), project=project, name=name or "/".join(folder.parts[-2:]), id=run_id,
                       **kwargs)


def log_image(logger: Logger, key: str, grid: torch.Tensor, step: int) -> None:
    """A (3, H, W) grid in [0, 1] to ``logger``, if it takes images (TensorBoard, W&B; CSV does not)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, grid, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[grid], step=step)
