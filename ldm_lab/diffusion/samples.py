"""Samples of a latent diffusion model to files: its parts loaded from a training checkpoint, an exported
``LDMPipeline`` folder or an original LDM checkpoint, and the images saved as PNGs and one grid (what
task=sample, task=evaluate and task=train after training use)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from ldm_lab.diffusion.sampling import generate_images
from ldm_lab.io.convert import converted, is_original
from ldm_lab.stages.build import load_stage
from ldm_lab.stages.first_stage import load_first_stage
from ldm_lab.stages.latent_diffusion import LatentDiffusionStage

log = logging.getLogger(__name__)


def load_sampler_parts(path: Path) -> tuple:
    """(evaluation UNet, first stage, latent scale, DDIM scheduler with the sampling spacing) of an LDM training
    checkpoint, an exported ``LDMPipeline`` folder or an original LDM checkpoint (converted and cached)."""
    if path.is_file() and is_original(path):
        path = converted(path, "pipeline")
    elif path.is_file():
        stage = load_stage(path, expect=LatentDiffusionStage, key="sample.model")
        return stage.eval_unet, stage.first_stage, float(stage.latent_scale), stage.sampling_scheduler
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"sample.model={path} is neither an LDM checkpoint (.ckpt) nor an exported "
                                f"pipeline folder (with model_index.json)")
    first_stage = load_first_stage(path / "vqvae")
    return (UNet2DModel.from_pretrained(path / "unet").eval(), first_stage, first_stage.vae.config.scaling_factor,
            DDIMScheduler.from_pretrained(path / "scheduler"))


def save_samples(images: torch.Tensor, out_dir: Path) -> Path:
    """Every image in [-1, 1] as ``sample_NNNNN.png`` and all of them as ``grid.png``; returns the grid's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images.clamp(-1, 1).add(1).div(2)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"sample_{i:05d}.png")
    grid = out_dir / "grid.png"
    save_image(make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0), grid)
    return grid


def draw_samples(options: DictConfig, unet, first_stage, latent_scale: float, noise_scheduler, out_dir: Path,
                 default_size: tuple[int, int]) -> Path:
    """Draw the images ``options`` (the config's ``sample.*``) asks for with the given parts and save them;
    returns the grid's path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet.to(device)
    first_stage.to(device)
    height, width = options.height or default_size[0], options.width or default_size[1]
    images = generate_images(unet, first_stage, latent_scale, noise_scheduler, options.num_images, height, width,
                             options.sampler, options.num_inference_steps, options.eta, options.batch_size,
                             torch.Generator().manual_seed(options.seed), progress=True)
    grid = save_samples(images, out_dir)
    log.info("%d samples (%dx%d, %s, %d steps, eta %.2g, seed %d): %s", len(images), width, height, options.sampler,
             options.num_inference_steps, options.eta, options.seed, out_dir)
    return grid
