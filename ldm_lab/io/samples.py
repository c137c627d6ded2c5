"""Samples of a latent diffusion model to files: PNGs and one grid (what task=sample, and task=train after
training, write)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from ldm_lab.diffusion.sampling import LatentDiffusionModel

log = logging.getLogger(__name__)


def save_samples(images: torch.Tensor, out_dir: Path) -> Path:
    """Every image in [-1, 1] as ``sample_NNNNN.png`` and all of them as ``grid.png``; returns the grid's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images.clamp(-1, 1).add(1).div(2)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"sample_{i:05d}.png")
    grid = out_dir / "grid.png"
    save_image(make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0), grid)
    return grid


def draw_samples(options: DictConfig, model: LatentDiffusionModel, out_dir: Path, default_size: tuple[int, int]) -> Path:
    """Draw the images ``options`` (the config's ``sample.*``) asks for, of ``default_size`` (height, width)
    unless ``sample.height`` / ``sample.width`` say otherwise, and save them; returns the grid's path."""
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    height, width = options.height or default_size[0], options.width or default_size[1]
    images = model.generate(options.num_images, height, width, sampler=options.sampler,
                            num_inference_steps=options.num_inference_steps, eta=options.eta,
                            batch_size=options.batch_size, generator=torch.Generator().manual_seed(options.seed),
                            progress=True)
    grid = save_samples(images, out_dir)
    log.info("%d samples (%dx%d, %s, %d steps, eta %.2g, seed %d): %s", len(images), width, height, options.sampler,
             options.num_inference_steps, options.eta, options.seed, out_dir)
    return grid
