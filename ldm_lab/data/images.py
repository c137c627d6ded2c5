"""Decoding any image file to the RGB picture a person would see."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB: transparency (RGBA, LA, P with a transparent colour) is
    composited on white, 16- and 32-bit greyscale is scaled to 8 bits, CMYK and the rest converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
