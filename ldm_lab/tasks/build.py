"""Instantiate a run's parts from its composed config, each through its ``_target_``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.stages.autoencoder import AutoencoderStage


def build_stage(model_cfg: DictConfig, disc_cfg: DictConfig) -> AutoencoderStage:
    stage = instantiate(model_cfg, discriminator=instantiate(disc_cfg, _partial_=True))
    stage.run_config = {"model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True),
                        "disc": OmegaConf.to_container(disc_cfg, resolve=True, enum_to_str=True)}
    return stage


def load_stage(ckpt_path: str | Path) -> AutoencoderStage:
    """The stage a training checkpoint holds, rebuilt from the config stored in it, for inference
    (export, evaluation): without the LPIPS loss and validation metrics, whose weights it needs not."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved = checkpoint["ldm_lab"]["config"]
    saved["model"]["loss"]["perceptual_weight"] = 0.0
    saved["model"]["metrics"].update(lpips=False, rfid=False)
    stage = build_stage(OmegaConf.create(saved["model"]), OmegaConf.create(saved["disc"]))
    stage.load_state_dict(checkpoint["state_dict"])
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
