"""Trained models as diffusers folders (what task=train writes after training and task=export from a
checkpoint, through the stage's ``export``). An autoencoder gets its latent scale measured; an unconditional
UNet trained with DDPM becomes an ``LDMPipeline`` folder (vqvae, unet, DDIM scheduler), every other latent
diffusion model (class-conditional, rectified flow, DiT) a folder of the same parts that carries its own
``pipeline.py`` (ldm_lab/io/latent_pipeline.py)."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from diffusers import LDMPipeline, UNet2DModel
from torch import nn

from ldm_lab.diffusion.sampling import LatentDiffusionModel, objective_of
from ldm_lab.io import latent_pipeline
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
    """A pipeline folder: the first stage (as ``vqvae``, with ``scaling_factor`` = the latent scale), the denoiser
    (as ``unet``) and the scheduler. An unconditional UNet of DDPM: an ``LDMPipeline`` (it samples square latents
    of ``unet.config.sample_size`` and divides by ``scaling_factor``). Any other: a ``LatentDiffusionPipeline``
    with the class names, and its code as ``pipeline.py``, which diffusers loads with ``custom_pipeline=<folder>``."""
    out_dir = Path(out_dir)
    vae = copy.deepcopy(model.first_stage.vae)
    vae.register_to_config(scaling_factor=float(model.latent_scale))
    plain = (model.class_names is None and isinstance(model.denoiser, UNet2DModel)
             and objective_of(model.scheduler) == "ddpm")
    if plain:
        LDMPipeline(vqvae=vae, unet=model.denoiser, scheduler=model.scheduler).save_pretrained(out_dir)
        loads = "LDMPipeline.from_pretrained"
    else:
        latent_pipeline.LatentDiffusionPipeline(vqvae=vae, unet=model.denoiser, scheduler=model.scheduler,
                                                class_names=model.class_names).save_pretrained(out_dir)
        shutil.copyfile(latent_pipeline.__file__, out_dir / "pipeline.py")
        classes = f", {len(model.class_names)} classes" if model.class_names else ""
        loads = f"DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True){classes}"
    log.info("exported %s (%s) with scaling_factor %.5f", out_dir, loads, float(model.latent_scale))
    return out_dir
