"""Instantiate a run's parts from its composed config, each through its ``_target_``."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.stages.autoencoder import AutoencoderStage


def build_stage(model_cfg: DictConfig, disc_cfg: DictConfig) -> AutoencoderStage:
    stage = instantiate(model_cfg, discriminator=instantiate(disc_cfg, _partial_=True))
    stage.run_config = {"model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True),
                        "disc": OmegaConf.to_container(disc_cfg, resolve=True, enum_to_str=True)}
    return stage


def build_datamodule(cfg: DictConfig, downsample_factor: int) -> ImageDataModule:
    """The configured data, checked against the model's downsampling factor."""
    return instantiate(cfg.data, downsample_factor=downsample_factor)


def build_trainer(cfg: DictConfig, accumulate_grad_batches: int) -> L.Trainer:
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate(cfg.logger),
        default_root_dir=cfg.paths.output_dir,
        # Validation (and so checkpoints) on accumulation boundaries, counted in micro-batches.
        val_check_interval=cfg.val_every_n_steps * accumulate_grad_batches,
        check_val_every_n_epoch=None,
    )
