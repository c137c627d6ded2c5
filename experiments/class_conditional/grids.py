"""One class-conditional model's samples at several guidance scales, from the same noise: a panel per scale, a
row per class, enlarged so a person sees them (nearest-neighbour, 3x), written to one PNG.

    .venv/bin/python experiments/class_conditional/grids.py <ldm run>/checkpoints/last.ckpt --out guidance_grids.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from ldm_lab.io.sources import load_latent_diffusion

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a class-conditional LDM: training checkpoint or exported folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 1.5, 3.0, 5.0])
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--side", type=int, default=32, help="pixels")
    parser.add_argument("--steps", type=int, default=200, help="DDIM steps")
    parser.add_argument("--zoom", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("guidance_grids.png"))
    args = parser.parse_args()
    model = load_latent_diffusion(args.model, "model")
    labels = torch.arange(len(model.class_names)).repeat_interleave(args.per_class)
    panels = []
    for scale in args.scales:
        images = model.generate(len(labels), args.side, args.side, num_inference_steps=args.steps,
                                generator=torch.Generator().manual_seed(0), class_labels=labels,
                                guidance_scale=scale)
        grid = make_grid(images.clamp(-1, 1).add(1).div(2), nrow=args.per_class, padding=2, pad_value=1.0)
        picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        picture = picture.resize((picture.width * args.zoom, picture.height * args.zoom), Image.NEAREST)
        titled = Image.new("RGB", (picture.width, picture.height + 24), "white")
        titled.paste(picture, (0, 24))
        ImageDraw.Draw(titled).text((4, 6), f"guidance {scale:g}" + (" (unconditional)" if scale == 0 else ""),
                                    fill="black")
        panels.append(titled)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 12 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 12
    sheet.save(args.out)
    print(f"rows: {', '.join(model.class_names)}; written: {args.out}")


if __name__ == "__main__":
    main()
