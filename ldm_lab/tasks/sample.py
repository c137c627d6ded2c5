"""task=sample: images from a latent diffusion model, as PNG files and one grid (ldm_lab/diffusion/samples.py).

    python run.py task=sample ckpt_path=outputs/.../checkpoints/last.ckpt sample.num_images=64
    python run.py task=sample sample.model=outputs/.../export sample.sampler=ddpm sample.num_inference_steps=1000
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.diffusion.samples import draw_samples, load_sampler_parts

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    if cfg.sample.model is None:
        raise ValueError("task=sample needs ckpt_path=<an LDM checkpoint> or sample.model=<an exported pipeline folder>")
    unet, first_stage, latent_scale, noise_scheduler = load_sampler_parts(Path(cfg.sample.model))
    side = unet.config.sample_size * first_stage.downsample_factor
    grid = draw_samples(cfg.sample, unet, first_stage, latent_scale, noise_scheduler,
                        Path(cfg.paths.output_dir) / "samples", (side, side))
    log.info("sample grid: %s", grid)
    return grid
