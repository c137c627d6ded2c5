"""Trained models as diffusers folders (what task=train writes after training and task=export from a
checkpoint). An autoencoder gets its latent scale measured; an unconditional UNet trained with DDPM becomes an
``LDMPipeline`` folder (vqvae, unet, DDIM scheduler); a KL first stage, a ``UNet2DConditionModel`` and a CLIP text
encoder trained with DDPM a ``StableDiffusionPipeline`` folder (no safety checker); a KL first stage, a
``PixArtTransformer2DModel`` and a T5 encoder trained with DDPM a ``PixArtAlphaPipeline`` folder; every other latent
diffusion model (class-conditional, rectified flow, DiT, the scratch encoder with PixArt, VQ with text) a
``LatentDiffusionPipeline`` folder of the same parts that carries its code as ``pipeline.py``
(ldm_lab/diffusion/pipeline.py)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    LDMPipeline,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

from ldm_lab.diffusion import pipeline as pipeline_code
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline
from ldm_lab.nn.frozen_autoencoder import measure_latent_scale

log = logging.getLogger(__name__)

PIXART_BINNED_SIZES = (32, 64, 128)  # the transformer sample sizes PixArtAlphaPipeline's resolution binning knows


def export_autoencoder(vae: nn.Module, datamodule, out_dir: Path, scale_batches: int = 4) -> Path:
    """Write ``vae`` with ``save_pretrained``; ``scaling_factor`` is 1/std of its latents on up to ``scale_batches``
    of the datamodule's validation batches, measured as the LDM's latent cache measures it
    (:class:`~ldm_lab.nn.frozen_autoencoder.LatentScale`: exact for a KL posterior, not one sample)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    scale = measure_latent_scale(vae.eval(), itertools.islice(datamodule.val_dataloader(), scale_batches))
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out_dir)
    log.info("exported %s (%s.from_pretrained) with scaling_factor %.5f", out_dir, type(vae).__name__, scale)
    return out_dir


def export_model(model: nn.Module | LatentDiffusionPipeline, out_dir: Path, datamodule: Callable[[], object]) -> Path:
    """A trained model as a diffusers folder: a latent diffusion pipeline carries its latent scale
    (:func:`export_pipeline`); an autoencoder's is measured on the data ``datamodule()`` builds
    (:func:`export_autoencoder`)."""
    if isinstance(model, LatentDiffusionPipeline):
        return export_pipeline(model, out_dir)
    return export_autoencoder(model, datamodule(), out_dir)


def export_pipeline(pipeline: LatentDiffusionPipeline, out_dir: Path) -> Path:
    """A pipeline folder of ``pipeline``'s parts: the first stage (``vqvae``, its ``scaling_factor`` the latent
    scale), the denoiser (``unet``), the scheduler and a text model's tokenizer and text encoder. An unconditional
    UNet of DDPM: an ``LDMPipeline`` (it samples square latents of ``unet.config.sample_size`` and divides by
    ``scaling_factor``); KL + ``UNet2DConditionModel`` + CLIP of DDPM: a ``StableDiffusionPipeline`` (the first stage
    as ``vae``; it encodes prompts as ours does); KL + ``PixArtTransformer2DModel`` + T5 of DDPM: a
    ``PixArtAlphaPipeline`` (it encodes prompts as ours does with ``clean_caption=False``). Any other: the
    ``LatentDiffusionPipeline`` with its class names and objective, its code as ``pipeline.py``, and
    ``model_index.json`` naming that file (diffusers' ``["pipeline", "LatentDiffusionPipeline"]``), so
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it."""
    out_dir = Path(out_dir)
    class_names = pipeline.config.class_names
    ddpm = pipeline.config.objective == "ddpm"
    plain = not class_names and isinstance(pipeline.unet, UNet2DModel) and ddpm
    kl_ddpm = ddpm and isinstance(pipeline.vqvae, AutoencoderKL)
    stable_diffusion = (kl_ddpm and isinstance(pipeline.unet, UNet2DConditionModel)
                        and isinstance(pipeline.text_encoder, CLIPTextModel))
    pixart = (kl_ddpm and isinstance(pipeline.unet, PixArtTransformer2DModel)
              and isinstance(pipeline.text_encoder, T5EncoderModel))
    if plain:
        LDMPipeline(vqvae=pipeline.vqvae, unet=pipeline.unet, scheduler=pipeline.scheduler).save_pretrained(out_dir)
        loads = "LDMPipeline.from_pretrained"
    elif stable_diffusion:
        StableDiffusionPipeline(vae=pipeline.vqvae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                                unet=pipeline.unet, scheduler=pipeline.scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(out_dir)
        loads = "StableDiffusionPipeline.from_pretrained"
    elif pixart:
        PixArtAlphaPipeline(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=pipeline.vqvae,
                            transformer=pipeline.unet, scheduler=pipeline.scheduler).save_pretrained(out_dir)
        sample_size, max_length = pipeline.unet.config.sample_size, pipeline.tokenizer.model_max_length
        binning = "" if sample_size in PIXART_BINNED_SIZES else ", use_resolution_binning=False"
        loads = (f"PixArtAlphaPipeline.from_pretrained; sample it with clean_caption=False, "
                 f"max_sequence_length={max_length}{binning}, as it was trained")
    else:
        pipeline.save_pretrained(out_dir)
        shutil.copyfile(pipeline_code.__file__, out_dir / "pipeline.py")
        index = out_dir / "model_index.json"
        config = json.loads(index.read_text())  # save_pretrained writes the class name as a plain string
        index.write_text(json.dumps({**config, "_class_name": ["pipeline", type(pipeline).__name__]}, indent=2) + "\n")
        classes = f", {len(class_names)} classes" if class_names else ""
        loads = f"DiffusionPipeline.from_pretrained(folder, trust_remote_code=True){classes}"
    log.info("exported %s (%s) with scaling_factor %.5f", out_dir, loads, pipeline.vqvae.config.scaling_factor)
    return out_dir
