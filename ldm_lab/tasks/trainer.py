"""The Trainer and the datamodule it fits, from a run's composed config, each through its ``_target_`` (the
stage: ldm_lab/stages/build.py)."""

from __future__ import annotations

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.io.checkpoints import AtomicCheckpointIO
from ldm_lab.stages.base import TrainingStage


def build_datamodule(cfg: DictConfig, downsample_factor: int = 1) -> ImageDataModule:
    """The configured data, checked against the model's downsampling factor (1: checked later, with
    ``check_downsample_factor``)."""
    return instantiate(cfg.data, downsample_factor=downsample_factor)


def build_trainer(cfg: DictConfig, stage: TrainingStage) -> L.Trainer:
    """The Trainer; the checkpoint callback monitors what the stage names (``stage.monitor``)."""
    callbacks = []
    for c in cfg.callbacks.values():
        if c is None:
            continue
        if issubclass(get_class(c._target_), ModelCheckpoint) and "monitor" not in c:
            callbacks.append(instantiate(c, monitor=stage.monitor, mode=stage.monitor_mode))
        else:
            callbacks.append(instantiate(c))
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=[instantiate(c) for c in (cfg.logger or {}).values() if c is not None] or False,
        # on SLURM, requeueing is callbacks/stop_signals.py's alone: Lightning's own would act on SIGUSR1 too
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])],
        default_root_dir=cfg.paths.output_dir,
        # Validation (and so checkpoints) on accumulation boundaries, counted in micro-batches.
        val_check_interval=cfg.val_every_n_steps * stage.accumulate_grad_batches,
        check_val_every_n_epoch=None,
    )
