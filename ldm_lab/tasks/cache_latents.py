"""task=cache_latents: encode the data set once with the first stage of ``model=unet`` (what
``task=train`` also does by itself before training on the cache).

    python run.py task=cache_latents model=unet model.first_stage=<first-stage .ckpt or export folder>
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.stages.build import build_stage
from ldm_lab.stages.encoding import encode_latent_cache
from ldm_lab.stages.latent_diffusion import LatentDiffusionStage
from ldm_lab.tasks.build import build_datamodule


def run(cfg: DictConfig) -> Path:
    stage = build_stage(cfg.model, cfg.disc, cfg.speed)
    if not isinstance(stage, LatentDiffusionStage):
        raise ValueError("task=cache_latents needs a latent diffusion model: model=unet (or unet_tiny) "
                         "model.first_stage=<first-stage checkpoint or export folder>")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    encode_latent_cache(stage.first_stage, datamodule, cfg.paths.latent_cache)
    return datamodule.latent_cache.dir
