"""Pixels for one bucket (seed 001/002): resize to cover the bucket, crop to it, optionally flip,
scale to [-1, 1]."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F


def bucket_transform(image: Image.Image, size: tuple[int, int], random_crop: bool, random_flip: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """An RGB image as a (3, height, width) float tensor in [-1, 1] for the bucket ``size`` = (height, width):
    the smallest resize that covers the bucket (antialiased), then a random or centered crop and an optional
    flip, drawn from ``generator``."""
    height, width = size
    scale = max(width / image.width, height / image.height)
    new_width = max(width, math.ceil(image.width * scale - 1e-6))
    new_height = max(height, math.ceil(image.height * scale - 1e-6))
    pixels = F.resize(F.to_image(image), [new_height, new_width], antialias=True)
    if random_crop:
        top = int(torch.randint(0, new_height - height + 1, (), generator=generator))
        left = int(torch.randint(0, new_width - width + 1, (), generator=generator))
    else:
        top, left = (new_height - height) // 2, (new_width - width) // 2
    pixels = F.crop(pixels, top, left, height, width)
    if random_flip and torch.rand((), generator=generator) < 0.5:
        pixels = F.horizontal_flip(pixels)
    return F.to_dtype(pixels, torch.float32, scale=True) * 2.0 - 1.0
