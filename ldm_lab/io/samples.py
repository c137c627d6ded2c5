"""Samples of a latent diffusion model to files: PNGs and one grid (what task=sample, and task=train after
training, write); a class-conditional model's in one folder per class, its grid a row per class; a
text-conditional model's in one folder per prompt, its grid a row per prompt with the prompt written under it.
Also the grid training previews draw (:func:`preview_samples`)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.pipeline import NULL_CLASS, LatentDiffusionPipeline
from ldm_lab.diffusion.sampling import SamplingOptions, generate, requested_classes, requested_prompts

log = logging.getLogger(__name__)

MAX_GRID_ROWS = 16  # a class-conditional grid shows at most this many classes, evenly spaced


def grid_classes(ids: list[int], max_rows: int = MAX_GRID_ROWS) -> list[int]:
    """The classes a grid shows a row each: all of ``ids``, or ``max_rows`` of them evenly spaced."""
    if len(ids) <= max_rows:
        return list(ids)
    return [ids[i] for i in np.linspace(0, len(ids) - 1, max_rows).round().astype(int)]


def folder_name(class_name: str) -> str:
    """A class name as a folder name: what a file system takes, the rest as ``_``."""
    return re.sub(r"[^\w.\-]+", "_", class_name).strip("._") or "_"


def save_samples(images: torch.Tensor, out_dir: Path) -> Path:
    """Every image in [-1, 1] as ``sample_NNNNN.png`` and all of them as ``grid.png``; returns the grid's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images.clamp(-1, 1).add(1).div(2)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"sample_{i:05d}.png")
    grid = out_dir / "grid.png"
    save_image(make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0), grid)
    return grid


def save_class_samples(images: torch.Tensor, labels: list[int], names: list[str], out_dir: Path) -> Path:
    """Images in [-1, 1] of classes ``labels`` (ids into ``names``, the null class after them) as
    ``<class name>/sample_NNNNN.png``, and ``grid.png`` with a row per class (:func:`grid_classes`); returns
    the grid's path."""
    images = images.clamp(-1, 1).add(1).div(2)
    names = [*names, NULL_CLASS]
    labels = torch.tensor(labels)
    for label in labels.unique().tolist():
        folder = out_dir / folder_name(names[label])
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[labels == label]):
            save_image(image, folder / f"sample_{i:05d}.png")
    order = list(dict.fromkeys(labels.tolist()))  # the classes as asked for, each once
    rows = [images[labels == label] for label in grid_classes(order)]
    per_row = max(len(row) for row in rows)
    grid = out_dir / "grid.png"
    save_image(make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=1.0), grid)
    return grid


def captioned_grid(images: torch.Tensor, per_row: int, captions: list[str]) -> torch.Tensor:
    """A grid of images in [0, 1], ``per_row`` to a row, with ``captions[r]`` written in a strip under row r."""
    grid = make_grid(images, nrow=per_row, padding=2, pad_value=1.0)
    rows = len(captions)
    row_height = (grid.shape[1] - 2) // rows
    strip = 12
    canvas = Image.new("RGB", (grid.shape[2], grid.shape[1] + rows * strip), "white")
    pixels = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for r, caption in enumerate(captions):
        top = r * row_height
        canvas.paste(pixels.crop((0, top, grid.shape[2], top + row_height + 2)), (0, top + r * strip))
        draw.text((2, top + r * strip + row_height + 1), caption, fill="black", font=ImageFont.load_default())
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def save_prompt_samples(images: torch.Tensor, prompts: list[str], per_prompt: int, out_dir: Path) -> Path:
    """Images in [-1, 1], ``per_prompt`` of each of ``prompts`` in turn, as ``<NN>-<prompt>/sample_NNNNN.png``, and
    ``grid.png`` with a row per prompt and the prompt under it; returns the grid's path."""
    images = images.clamp(-1, 1).add(1).div(2)
    for p, prompt in enumerate(prompts):
        folder = out_dir / f"{p:02d}-{folder_name(prompt)[:60]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[p * per_prompt : (p + 1) * per_prompt]):
            save_image(image, folder / f"sample_{i:05d}.png")
    grid = out_dir / "grid.png"
    save_image(captioned_grid(images, per_prompt, prompts), grid)
    return grid


def draw_samples(options: SamplingOptions, pipeline: LatentDiffusionPipeline, out_dir: Path,
                 default_size: tuple[int, int], default_prompts: list[str] | None = None) -> Path:
    """Draw the images ``options`` (the config's ``sample.*``) asks for, of ``default_size`` (height, width)
    unless ``sample.height`` / ``sample.width`` say otherwise, and save them; returns the grid's path. A
    class-conditional model draws ``sample.num_images`` of each class of ``sample.class_labels``, a
    text-conditional one of each prompt of ``sample.prompts`` / ``sample.prompt_file`` (else of
    ``default_prompts``), guided by ``sample.guidance_scale``."""
    if options.num_images < 1:
        raise ConfigError(f"sample.num_images={options.num_images}: give how many images to draw (per class or "
                          f"prompt), at least 1")
    pipeline.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    height, width = options.size(default_size)
    generator = torch.Generator().manual_seed(options.seed)
    described = f"{options.sampler}, {options.num_inference_steps} steps, eta {options.eta:.2g}, seed {options.seed}"
    class_names = pipeline.config.class_names
    if pipeline.text_encoder is not None:
        given = options.prompts is not None or options.prompt_file is not None
        prompts = requested_prompts(options) if given or not default_prompts else list(default_prompts)
        texts = [prompt for prompt in prompts for _ in range(options.num_images)]
        images = generate(pipeline, options, len(texts), height, width, generator, prompts=texts,
                          guidance_scale=options.guidance_scale, progress=True)
        grid = save_prompt_samples(images, prompts, options.num_images, out_dir)
        described += f", {len(prompts)} prompts x {options.num_images}, guidance {options.guidance_scale:g}"
    elif not class_names:
        images = generate(pipeline, options, options.num_images, height, width, generator, progress=True)
        grid = save_samples(images, out_dir)
    else:
        labels = [i for i in requested_classes(options, class_names) for _ in range(options.num_images)]
        images = generate(pipeline, options, len(labels), height, width, generator, class_labels=labels,
                          guidance_scale=options.guidance_scale, progress=True)
        grid = save_class_samples(images, labels, class_names, out_dir)
        described += f", {len(set(labels))} classes x {options.num_images}, guidance {options.guidance_scale:g}"
    log.info("%d samples (%dx%d, %s): %s", len(images), width, height, described, out_dir)
    return grid


def preview_samples(pipeline: LatentDiffusionPipeline, options: SamplingOptions, num_images: int,
                    size: tuple[int, int], seed: int, prompts: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """A training preview: ``num_images`` samples of ``size`` (height, width) from the same noise every time
    (``seed``), in one batch, drawn as ``options`` say; returns (images in [-1, 1], images per row). A
    class-conditional model's grid has a row per class (:func:`grid_classes`) of ``num_images`` // rows images, a
    text-conditional model's a row per prompt of ``prompts``."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    if pipeline.text_encoder is not None:
        per_row = max(1, num_images // len(prompts))
        texts = [prompt for prompt in prompts for _ in range(per_row)]
        images = generate(pipeline, options, len(texts), height, width, generator, prompts=texts,
                          guidance_scale=options.guidance_scale, batch_size=len(texts))
        return images, per_row
    if not pipeline.config.class_names:
        images = generate(pipeline, options, num_images, height, width, generator, batch_size=num_images)
        return images, math.ceil(math.sqrt(num_images))
    rows = grid_classes(requested_classes(options, pipeline.config.class_names))
    per_row = max(1, num_images // len(rows))
    labels = [label for label in rows for _ in range(per_row)]
    images = generate(pipeline, options, len(labels), height, width, generator, class_labels=labels,
                      guidance_scale=options.guidance_scale, batch_size=len(labels))
    return images, per_row
