"""task=cache_latents: encode the data set once with the first stage of ``model=unet`` (what
``task=train`` also does by itself before training on the cache).

    python run.py task=cache_latents model=unet model.first_stage=<first-stage .ckpt or export folder>
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.stages.build import build_stage
from ldm_lab.tasks.trainer import build_datamodule


def run(cfg: DictConfig) -> Path:
    stage = build_stage(cfg.model, cfg.disc, cfg.speed)
    return stage.encode_latent_cache(build_datamodule(cfg, stage.downsample_factor), cfg.paths.latent_cache)
