"""Trained models as diffusers folders (what task=train writes after training and task=export from a
checkpoint, through the stage's ``export``). An autoencoder gets its latent scale measured; a latent
diffusion model becomes an ``LDMPipeline`` folder (vqvae, unet, DDIM scheduler)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path

from diffusers import LDMPipeline
from torch import nn

from ldm_lab.diffusion.sampling import LatentDiffusionModel
from ldm_lab.nn.frozen_autoencoder import measure_latent_scale

log = logging.getLogger(__name__)


def export_autoencoder(vae: nn.Module, pixel_batches: Iterable[dict], out_dir: Path) -> Path:
    """Write ``vae`` with ``save_pretrained``; ``scaling_factor`` is 1/std of its latents on ``pixel_batches``,
    measured as the LDM's latent cache measures it (:class:`~ldm_lab.nn.frozen_autoencoder.LatentScale`:
    exact for a KL posterior, not one sample)."""
    scale = measure_latent_scale(vae, pixel_batches)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out_dir)
    log.info("exported %s (%s.from_pretrained) with scaling_factor %.5f", out_dir, type(vae).__name__, scale)
    return out_dir


def export_pipeline(model: LatentDiffusionModel, out_dir: Path) -> Path:
    """An ``LDMPipeline`` folder: the first stage (as ``vqvae``, with ``scaling_factor`` = the latent scale),
    the UNet and the scheduler. LDMPipeline samples square latents of ``unet.config.sample_size`` and divides
    by ``scaling_factor``."""
    vae = copy.deepcopy(model.first_stage.vae)
    vae.register_to_config(scaling_factor=float(model.latent_scale))
    LDMPipeline(vqvae=vae, unet=model.unet, scheduler=model.scheduler).save_pretrained(out_dir)
    log.info("exported %s (LDMPipeline.from_pretrained) with scaling_factor %.5f", out_dir, float(model.latent_scale))
    return out_dir
