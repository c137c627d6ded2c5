"""task=train: fit the stage, validate before and after, export a diffusers folder."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ldm_lab.tasks.build import build_datamodule, build_stage, build_trainer
from ldm_lab.tasks.export import export_autoencoder

log = logging.getLogger(__name__)


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def run(cfg: DictConfig) -> dict[str, float]:
    logging.getLogger("lightning.pytorch").handlers.clear()  # Hydra's root handler prints its messages once
    # ImageDataModule.state_dict resumes a stopped epoch itself; Lightning cannot see that.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    stage = build_stage(cfg.model, cfg.disc)
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    trainer = build_trainer(cfg, stage.accumulate_grad_batches)
    log.info("run folder: %s", output_dir)
    log.info("TensorBoard: tensorboard --logdir %s", output_dir / "tensorboard")

    if cfg.ckpt_path is None:
        trainer.validate(stage, datamodule=datamodule, verbose=False)
        log.info("validation before training (step 0): %s", _format(stage.last_val_metrics))
    trainer.fit(stage, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trainer.validate(stage, datamodule=datamodule, verbose=False)
    log.info("validation after training (step %d): %s", stage.gen_step, _format(stage.last_val_metrics))
    if stage.nonfinite_skipped:
        log.warning("%d micro-batches were skipped for a non-finite loss", stage.nonfinite_skipped)

    if not trainer.is_global_zero:  # under DDP every rank runs this function; one exports
        return stage.last_val_metrics
    export_dir = export_autoencoder(stage, datamodule, output_dir / "export")
    checkpoint_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None
    log.info("checkpoints: %s (resume: python run.py ckpt_path=%s)", checkpoint_dir,
             checkpoint_dir / "last.ckpt" if checkpoint_dir else "<checkpoint>")
    log.info("image grids: %s", output_dir / "images")
    log.info("diffusers folder: %s (%s.from_pretrained)", export_dir, type(stage.eval_vae).__name__)
    return stage.last_val_metrics
