"""The embedded data's captioned variant (``data.source.captions=true``): pictures whose captions say in words what
was drawn, so a text-conditional model trains offline and what a sample shows can be read back and checked
against its prompt.

Each picture is a square of the training resolution (so no crop cuts a shape away; a flip keeps every caption
true) holding one to three shapes of one kind (circle, square or triangle) and one named colour, apart from each
other and whole on the canvas, on a gradient between two shades of another named colour. Its captions (one per
line, the trainer draws one per epoch) name the count, the colour, the kind and the background:
``two red circles on a blue background``, ``a blue background with two red circles``,
``2 red circles, blue background``. A sample **matches its prompt** when what is read back from it has the
prompt's kind, count, shape colour and background colour, all four.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 70), "blue": (45, 80, 215), "yellow": (235, 205, 45),
           "white": (240, 240, 240), "black": (30, 30, 30)}
NUMBERS = ("one", "two", "three")
MAX_TRIES = 200  # placements tried per shape before the picture is drawn again with fewer shapes
GAP = 2  # pixels between two shapes' boxes, so that two never read as one


def describe(kind: int, count: int, colour: str, background: str) -> tuple[str, ...]:
    """The captions of a picture: three phrasings of the same four facts."""
    shapes = f"{colour} {KINDS[kind]}{'s' if count > 1 else ''}"
    return (f"{NUMBERS[count - 1]} {shapes} on a {background} background",
            f"a {background} background with {NUMBERS[count - 1]} {shapes}",
            f"{count} {shapes}, {background} background")


def _place(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[float, float, float]] | None:
    """``count`` shapes as (x, y, size) whose boxes lie on the canvas and keep ``GAP`` pixels apart, or None."""
    placed = []
    for _ in range(count):
        for _ in range(MAX_TRIES):
            size = min(width, height) * rng.uniform(0.24, 0.34)
            x, y = rng.uniform(1, [width - size - 1, height - size - 1])
            if all(x + size + GAP < px or px + ps + GAP < x or y + size + GAP < py or py + ps + GAP < y
                   for px, py, ps in placed):
                placed.append((x, y, size))
                break
        else:
            return None
    return placed


def draw_captioned(rng: np.random.Generator, width: int, height: int | None = None
                   ) -> tuple[Image.Image, tuple[str, ...], dict]:
    """One captioned picture of ``width`` x ``height`` pixels (square by default): the image, its captions and what
    was drawn (``kind``, ``count``, ``colour``, ``background``)."""
    height = height or width
    names = list(COLOURS)
    kind, count = int(rng.integers(len(KINDS))), int(rng.integers(1, 4))
    colour, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    placed = _place(rng, width, height, count)
    while placed is None:  # three shapes this large do not always fit
        count -= 1
        placed = _place(rng, width, height, count)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width] / np.array([max(height - 1, 1), max(width - 1, 1)])[:, None, None]
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    base = np.array(COLOURS[background], dtype=np.float64)
    pixels = base * (0.75 + 0.25 * t[..., None])  # two shades of the background's colour
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for x, y, size in placed:
        box = (x, y, x + size, y + size)
        if KINDS[kind] == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif KINDS[kind] == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
    drawn = {"kind": KINDS[kind], "count": count, "colour": colour, "background": background}
    return image, describe(kind, count, colour, background), drawn
