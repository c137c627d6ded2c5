"""A trained stage as a diffusers folder (what task=train writes after training and task=export from a
checkpoint). An autoencoder gets its latent scale measured; a latent diffusion model becomes an
``LDMPipeline`` folder (vqvae, unet, DDIM scheduler)."""

from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path

from diffusers import LDMPipeline

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.stages.autoencoder import AutoencoderStage
from ldm_lab.stages.first_stage import measure_latent_scale
from ldm_lab.stages.latent_diffusion import LatentDiffusionStage

log = logging.getLogger(__name__)


def export_autoencoder(stage: AutoencoderStage, datamodule: ImageDataModule, out_dir: Path,
                       scale_batches: int = 4) -> Path:
    """Write the evaluation weights (EMA when on) with ``save_pretrained``; ``scaling_factor`` is 1/std of
    its latents on up to ``scale_batches`` validation batches, measured as the LDM's latent cache measures
    it (:class:`~ldm_lab.stages.first_stage.LatentScale`: exact for a KL posterior, not one sample)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    stage.eval()
    vae = stage.eval_vae
    scale = measure_latent_scale(vae, itertools.islice(datamodule.val_dataloader(), scale_batches))
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
