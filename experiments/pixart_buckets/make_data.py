"""The captioned synthetic drawings on canvases of three shapes, as a folder of images with sidecar captions: what
experiments/pixart_buckets trains on. Shapes lie anywhere on the canvas, so a square center crop of a 48x32 or
32x48 picture can cut one away and make its caption false; buckets keep the whole picture.

    python experiments/pixart_buckets/make_data.py <folder> [--per-shape 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ldm_lab.data.synthetic_captions import draw_captioned

SHAPES = ((32, 32), (48, 32), (32, 48))  # (width, height): square, landscape, portrait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-shape", type=int, default=1024)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(args.folder / "drawn.jsonl", "w") as drawn:
        for i in range(args.per_shape * len(SHAPES)):
            width, height = SHAPES[i % len(SHAPES)]
            image, captions, facts = draw_captioned(rng, width, height)
            image.save(args.folder / f"{i:05d}.png")
            (args.folder / f"{i:05d}.txt").write_text("\n".join(captions) + "\n")
            drawn.write(json.dumps({"file_name": f"{i:05d}.png", "width": width, "height": height, **facts}) + "\n")
    print(f"{args.per_shape * len(SHAPES)} pictures in {args.folder}")


if __name__ == "__main__":
    main()
