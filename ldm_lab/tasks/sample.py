"""task=sample: images from a latent diffusion model, as PNG files and one grid (ldm_lab/io/samples.py).

    python run.py task=sample ckpt_path=outputs/.../checkpoints/last.ckpt sample.num_images=64
    python run.py task=sample sample.model=outputs/.../export sample.sampler=ddpm sample.num_inference_steps=1000
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.sampling import SamplingOptions
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.io.samples import draw_samples

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    if cfg.sample.model is None:
        raise ConfigError("task=sample needs ckpt_path=<an LDM checkpoint> or sample.model=<an exported pipeline folder>")
    pipeline = load_latent_diffusion(cfg.sample.model, "sample.model")
    side = pipeline.unet.config.sample_size * pipeline.downsample_factor
    grid = draw_samples(SamplingOptions.from_config(cfg.sample), pipeline, Path(cfg.paths.output_dir) / "samples",
                        (side, side))
    log.info("sample grid: %s", grid)
    return grid
