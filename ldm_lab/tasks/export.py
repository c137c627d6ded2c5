"""task=export: a trained stage as a diffusers folder. An autoencoder gets its latent scale measured;
a latent diffusion model becomes an ``LDMPipeline`` folder (vqvae, unet, DDIM scheduler).

    python run.py task=export ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path

import torch
from diffusers import LDMPipeline
from omegaconf import DictConfig

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.stages.autoencoder import AutoencoderStage
from ldm_lab.stages.latent_diffusion import LatentDiffusionStage
from ldm_lab.tasks.build import build_datamodule, load_stage

log = logging.getLogger(__name__)


@torch.no_grad()
def latent_scale(stage: AutoencoderStage, batches) -> float:
    """1 / std of the stage's latents over ``batches``: the ``scaling_factor`` that gives the diffusion
    model unit-variance latents (LDM, sec. 4.3.2 and D.1; 0.18215 for SD's VAE). Any sampling noise
    is seeded, so the same weights and data always give the same scale."""
    generator = torch.Generator(stage.device).manual_seed(0)
    latents = [stage.sample_latents(batch["pixel_values"].to(stage.device), generator) for batch in batches]
    return float(1.0 / torch.cat([z.flatten() for z in latents]).float().std())


def export_autoencoder(stage: AutoencoderStage, datamodule: ImageDataModule, out_dir: Path,
                       scale_batches: int = 4) -> Path:
    """Write the evaluation weights (EMA when on) with ``save_pretrained``; ``scaling_factor`` is
    measured on up to ``scale_batches`` validation batches."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    stage.eval()
    vae = stage.eval_vae
    scale = latent_scale(stage, itertools.islice(datamodule.val_dataloader(), scale_batches))
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out_dir)
    log.info("exported %s with scaling_factor %.5f", out_dir, scale)
    return out_dir


def export_pipeline(stage: LatentDiffusionStage, out_dir: Path) -> Path:
    """An ``LDMPipeline`` folder: the first stage (as ``vqvae``, with ``scaling_factor`` = the stage's
    latent scale), the evaluation UNet (EMA when on) and the stage's DDIM scheduler (training betas, LDM's spacing).
    LDMPipeline samples square latents of ``unet.config.sample_size`` and divides by ``scaling_factor``."""
    vae = copy.deepcopy(stage.first_stage.vae)
    vae.register_to_config(scaling_factor=float(stage.latent_scale))
    LDMPipeline(vqvae=vae, unet=stage.eval_unet, scheduler=stage.sampling_scheduler).save_pretrained(out_dir)
    log.info("exported %s (LDMPipeline) with scaling_factor %.5f", out_dir, float(stage.latent_scale))
    return out_dir


def run(cfg: DictConfig) -> Path:
    if cfg.ckpt_path is None:
        raise ValueError("task=export needs ckpt_path=/path/to/checkpoint.ckpt")
    stage = load_stage(cfg.ckpt_path)
    if isinstance(stage, LatentDiffusionStage):
        return export_pipeline(stage, Path(cfg.paths.output_dir) / "export")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    return export_autoencoder(stage, datamodule, Path(cfg.paths.output_dir) / "export")
