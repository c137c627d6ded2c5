"""task=train: fit the stage, validate before and after, export its trained model as a diffusers folder, and
draw a grid of samples from a latent diffusion model's."""

from __future__ import annotations

import logging
import os
import shlex
import warnings
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm_lab.callbacks.image_logger import PREVIEW_PROMPTS
from ldm_lab.callbacks.stop_signals import RunStopped
from ldm_lab.config.slurm import slurm_job_id
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline
from ldm_lab.diffusion.sampling import SamplingOptions
from ldm_lab.io.checkpoints import claim_run_folder, read_checkpoint
from ldm_lab.io.export import export_model
from ldm_lab.io.samples import draw_samples
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import model_config
from ldm_lab.tasks.trainer import build_datamodule, build_trainer

log = logging.getLogger(__name__)


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def resume_command(checkpoint: Path, output_dir: Path) -> str:
    """This launch's command line with ``ckpt_path`` set and the run folder pinned: how to go on from ``checkpoint``."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["python", "run.py", *kept, f"ckpt_path={checkpoint}", f"hydra.run.dir={output_dir}"])


def requeued_checkpoint(trainer: L.Trainer) -> str | None:
    """A SLURM job started again after ``scontrol requeue`` (SLURM_RESTART_COUNT > 0; callbacks/stop_signals.py)
    carries no ckpt_path: it resumes from its run folder's (conf/hydra/default.yaml: named by the job id) last.ckpt."""
    callback = trainer.checkpoint_callback
    if int(os.environ.get("SLURM_RESTART_COUNT", 0)) == 0 or callback is None:
        return None
    last = Path(callback.dirpath) / "last.ckpt"
    if not last.is_file():
        return None
    log.info("requeued SLURM job %s (restart %s): resuming from %s", slurm_job_id(),
             os.environ["SLURM_RESTART_COUNT"], last)
    return str(last)


def run(cfg: DictConfig) -> dict[str, float]:
    logging.getLogger("lightning.pytorch").handlers.clear()  # Hydra's root handler prints its messages once
    # ImageDataModule.state_dict resumes a stopped epoch itself; Lightning cannot see that.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode")  # the LDM's frozen first stage
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    model = model_config.with_data(cfg.model, datamodule, output_dir / "tokenizer", cfg.ckpt_path)
    stage = build_stage(model, cfg.disc, cfg.speed)
    datamodule.check_downsample_factor(stage.downsample_factor)
    trainer = build_trainer(cfg, stage)
    ckpt_path = cfg.ckpt_path or requeued_checkpoint(trainer)
    if trainer.is_global_zero and trainer.checkpoint_callback is not None:
        claim_run_folder(output_dir, trainer.checkpoint_callback.dirpath, ckpt_path, cfg.overwrite)
    if ckpt_path is not None:  # before Lightning loads it: a clear refusal instead of a silent mismatch
        resumed = read_checkpoint(ckpt_path, mmap=True)
        stage.check_resume(resumed, ckpt_path)
        datamodule.check_resume(resumed.get(type(datamodule).__qualname__), ckpt_path, trainer.world_size)
        log.info("resuming from %s at step %d", ckpt_path, resumed["ldm_lab"]["step"])
    stage.attach_data(datamodule, cfg.paths.latent_cache)  # after the checks, which a refused run should not wait for
    log.info("run folder: %s", output_dir)
    for logger in trainer.loggers:  # conf/logger/: tensorboard (default), csv, wandb, or a list of them
        log.info("%s: %s", type(logger).__name__, getattr(logger, "log_dir", None) or logger.save_dir)

    if ckpt_path is None:
        trainer.validate(stage, datamodule=datamodule, verbose=False)
        log.info("validation before training (step 0): %s", _format(stage.last_val_metrics))
    try:
        trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path)
    except RunStopped as stopped:  # SIGTERM or SIGINT: run.py exits with stopped.exit_code
        log.warning("resume: %s", resume_command(stopped.checkpoint, output_dir))
        raise
    trainer.validate(stage, datamodule=datamodule, verbose=False)
    log.info("validation after training (step %d): %s", stage.step, _format(stage.last_val_metrics))
    if stage.nonfinite_skipped:
        log.warning("%d micro-batches were skipped for a non-finite loss", stage.nonfinite_skipped)

    if not trainer.is_global_zero:  # under DDP every rank runs this function; one exports
        return stage.last_val_metrics
    checkpoint_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None
    log.info("checkpoints: %s (resume: python run.py ckpt_path=%s)", checkpoint_dir,
             checkpoint_dir / "last.ckpt" if checkpoint_dir else "<checkpoint>")
    log.info("image grids: %s", output_dir / "images")
    model = stage.trained_model()
    log.info("diffusers folder: %s", export_model(model, output_dir / "export", lambda: datamodule))
    if isinstance(model, LatentDiffusionPipeline) and cfg.sample.num_images > 0:  # sample.*, the leftover bucket's size
        stage.cpu()  # draw_samples takes the pipeline's networks to the GPU, the rest stays off it
        grid = draw_samples(SamplingOptions.from_config(cfg.sample), model, output_dir / "samples",
                            datamodule.leftover_resolution,
                            datamodule.preview_captions(PREVIEW_PROMPTS) if datamodule.captioned else None)
        log.info("sample grid: %s", grid)
    return stage.last_val_metrics
