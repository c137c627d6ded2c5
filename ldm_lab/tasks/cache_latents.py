"""task=cache_latents: encode the data set once with the first stage of ``model=unet`` and, with
``model.representation.loss=repa``, REPA's image encoder (what ``task=train`` also does by itself before training on
the cache); nothing else of the model is built.

    python run.py task=cache_latents model=unet model.first_stage=<first-stage .ckpt or export folder>
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.nn import image_encoders
from ldm_lab.stages.encoding import encode_feature_cache, encode_latent_cache
from ldm_lab.tasks.model_config import downsample_factor, is_latent_diffusion
from ldm_lab.tasks.trainer import build_datamodule


def run(cfg: DictConfig) -> Path:
    if not is_latent_diffusion(cfg.model) or not cfg.model.first_stage:
        raise ConfigError("task=cache_latents encodes images with a latent diffusion model's first stage: use "
                          "model=unet (or unet_tiny, dit, dit_tiny) model.first_stage=<first-stage checkpoint or "
                          "export folder>")
    first_stage = load_first_stage(cfg.model.first_stage)
    datamodule = build_datamodule(cfg, downsample_factor(cfg.model, first_stage))
    encode_latent_cache(first_stage, datamodule, cfg.paths.latent_cache)
    representation = cfg.model.get("representation") or {}
    if representation.get("loss") == "repa":
        encoder = image_encoders.load(representation.encoder, representation.encoder_weights,
                                      representation.patch_pixels)
        encode_feature_cache(encoder, datamodule, cfg.paths.latent_cache)
    return datamodule.latent_cache.dir
