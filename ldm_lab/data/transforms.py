"""Pixel pipeline of seed 001: RGB, resize the short side, crop a square, optional flip, [-1, 1]."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def image_transform(resolution: int, random_crop: bool, random_flip: bool) -> v2.Compose:
    crop = v2.RandomCrop(resolution) if random_crop else v2.CenterCrop(resolution)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resolution, antialias=True),
        crop,
        v2.RandomHorizontalFlip() if random_flip else v2.Identity(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])
