"""The embedded default data set: images drawn deterministically from a seed.

Gradient backgrounds with ellipses, rectangles, polygons and lines in random colours, at a spread of
sizes and aspect ratios, saved as PNG, JPEG and WebP so the same decoding path as real data runs. With
``num_classes`` the set has classes, one subfolder each: class k draws only shapes of kind k mod 4 on a
gradient whose hues lie in the k-th of ``num_classes`` bands around the colour wheel. With ``captions`` it is
the captioned variant (ldm_lab/data/synthetic_captions.py), a caption file beside each picture.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm_lab.core.atomic import publish_folder, side_folder
from ldm_lab.core.errors import ConfigError
from ldm_lab.data.sources import FolderSource
from ldm_lab.data.synthetic_captions import draw_captioned

FORMATS = ("png", "jpg", "webp")
SHAPES = ("ellipses", "rectangles", "polygons", "lines")

NUM_ATTRIBUTES = 15  # what draw_image drew, as numbers (the offline feature network learns to read them)


def class_names(num_classes: int) -> list[str]:
    """Folder names that sort in id order and say what class k draws: its shapes and its hue band's middle."""
    return [f"{k:02d}-{SHAPES[k % len(SHAPES)]}-hue{round(360 * (k + 0.5) / num_classes) % 360:03d}"
            for k in range(num_classes)]


def class_colours(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    """Two RGB colours (0-255) whose hues lie in the middle 60% of band ``label`` of ``num_classes``, fairly
    saturated and bright, so neighbouring classes stay apart."""
    hues = (label + rng.uniform(0.2, 0.8, size=2)) / num_classes
    saturations, values = rng.uniform(0.5, 1.0, size=(2, 2))
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, saturations, values, strict=True)]) * 255


def draw_image(rng: np.random.Generator, width: int, height: int, label: int | None = None,
               num_classes: int = 0) -> tuple[Image.Image, np.ndarray]:
    """One synthetic picture: a linear two-colour gradient and 3-8 filled shapes; and what was drawn,
    ``NUM_ATTRIBUTES`` numbers in [-1, 1]: the two gradient colours, its direction, the count of each
    kind of shape (ellipse, rectangle, polygon, line) and the shapes' mean colour. With a ``label`` (of
    ``num_classes``) the gradient's colours come from the class's hue band and every shape is of kind
    ``label`` mod 4; without one, everything is random (the pictures of the unlabelled set)."""
    c0, c1 = rng.integers(0, 256, size=(2, 3)) if label is None else class_colours(rng, label, num_classes)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (xs / max(width - 1, 1)) * np.cos(angle) + (ys / max(height - 1, 1)) * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    pixels = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    kinds, colours = np.zeros(4), []
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, size=2) * width)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, size=2) * height)
        kind = rng.integers(0, 4) if label is None else label % len(SHAPES)
        kinds[kind] += 1
        colours.append(colour)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            points = [(float(x), float(y)) for x, y in rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2))
                      * (width, height)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, max(2, min(width, height) // 8))))
    attributes = np.concatenate([c0 / 127.5 - 1, c1 / 127.5 - 1, [np.cos(angle), np.sin(angle)], kinds / 4 - 1,
                                 np.mean(colours, axis=0) / 127.5 - 1])
    return image, attributes.astype(np.float32)


def image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the short side in [min_side, max_side] and aspect ratio in [1/2, 2]."""
    short = int(rng.integers(min_side, max_side + 1))
    long = int(round(short * np.exp(rng.uniform(0, np.log(2)))))
    return (long, short) if rng.random() < 0.5 else (short, long)


class SyntheticSource(FolderSource):
    """``num_images`` synthetic images written once under ``root/<seed>-<num_images>-...`` and then read
    like any folder. A finished set carries a manifest; an unfinished one is rewritten. ``num_classes``:
    image i is of class i mod ``num_classes`` (as many of each), in that class's subfolder (:func:`class_names`),
    and the images are labelled by subfolder. ``captions``: squares of ``resolution`` pixels (the training size,
    so no crop cuts a shape away) with their captions beside them, and what each shows in ``drawn.jsonl``
    (:func:`~ldm_lab.data.synthetic_captions.draw_captioned`)."""

    def __init__(self, root: str | Path, num_images: int = 512, seed: int = 0, min_side: int = 64,
                 max_side: int = 192, num_classes: int | None = None, captions: bool = False,
                 resolution: int | None = None):
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"data.source.num_classes={num_classes}: at least 2 classes, or null for none")
        if captions and (num_classes or not resolution):
            raise ConfigError("data.source.captions=true draws captioned squares of data.resolution, without "
                              "classes: set data.source.num_classes=null")
        self.spec = {"num_images": num_images, "seed": seed, "min_side": min_side, "max_side": max_side}
        folder = f"seed{seed}-n{num_images}-side{min_side}-{max_side}"
        if num_classes:  # the unlabelled set keeps its folder and manifest
            self.spec["num_classes"] = num_classes
            folder += f"-k{num_classes}"
        if captions:
            self.spec.update(captions=True, resolution=resolution)
            folder = f"seed{seed}-n{num_images}-captions-r{resolution}"
        super().__init__(Path(root).expanduser() / folder, labels="subfolder" if num_classes else None,
                         caption_extension=".txt" if captions else None)

    def _complete(self, folder: Path) -> bool:
        manifest = folder / "manifest.json"
        return manifest.is_file() and json.loads(manifest.read_text()) == self.spec

    def prepare(self) -> None:
        """Draw the set once into a side folder and publish it whole: jobs started together on one
        ``paths.data_dir`` each finish with the one set (ldm_lab/core/atomic.py)."""
        if self._complete(self.root):
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        built = side_folder(self.root)
        num_classes = self.spec.get("num_classes")
        folders = [built / name for name in class_names(num_classes)] if num_classes else [built]
        for folder in folders:
            folder.mkdir(exist_ok=True)
        if self.spec.get("captions"):
            self._draw_captioned(built)
        for index in range(0 if self.spec.get("captions") else self.spec["num_images"]):
            rng = np.random.default_rng([self.spec["seed"], index])
            width, height = image_size(rng, self.spec["min_side"], self.spec["max_side"])
            fmt = FORMATS[index % len(FORMATS)]
            label = index % num_classes if num_classes else None
            image = draw_image(rng, width, height, label, num_classes or 0)[0]
            image.save(folders[label or 0] / f"{index:06d}.{fmt}", quality=95)
        (built / "manifest.json").write_text(json.dumps(self.spec))  # marks the set complete
        publish_folder(built, self.root, self._complete)

    def _draw_captioned(self, built: Path) -> None:
        with open(built / "drawn.jsonl", "w") as drawn_file:
            for index in range(self.spec["num_images"]):
                rng = np.random.default_rng([self.spec["seed"], index])
                image, captions, drawn = draw_captioned(rng, self.spec["resolution"])
                name = f"{index:06d}.{FORMATS[index % len(FORMATS)]}"
                image.save(built / name, quality=95)
                (built / f"{index:06d}.txt").write_text("\n".join(captions) + "\n")
                drawn_file.write(json.dumps({"file_name": name, **drawn}) + "\n")
