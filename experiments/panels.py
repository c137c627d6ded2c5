"""Titled image panels side by side on one sheet: what the experiments' figure scripts draw samples with."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid


def panel(images: torch.Tensor, per_row: int, title: str, zoom: int = 3) -> Image.Image:
    """Images in [-1, 1] as a grid of ``per_row`` columns, enlarged ``zoom`` times (nearest-neighbour, so a
    person sees the pixels' edges), under ``title``."""
    grid = make_grid(images.clamp(-1, 1).add(1).div(2), nrow=per_row, padding=2, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    titled = Image.new("RGB", (picture.width, picture.height + 24), "white")
    titled.paste(picture, (0, 24))
    ImageDraw.Draw(titled).text((4, 6), title, fill="black")
    return titled


def save_sheet(panels: list[Image.Image], out: Path, gap: int = 12) -> None:
    """The panels left to right, ``gap`` pixels apart, as one PNG."""
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)),
                      "white")
    x = 0
    for picture in panels:
        sheet.paste(picture, (x, 0))
        x += picture.width + gap
    sheet.save(out)
