"""One class-conditional model's samples at several guidance scales, from the same noise: a panel per scale, a
row per class, enlarged so a person sees them (nearest-neighbour, 3x), written to one PNG.

    .venv/bin/python experiments/class_conditional/grids.py <ldm run>/checkpoints/last.ckpt --out guidance_grids.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.panels import panel, save_sheet  # noqa: E402


def main() -> None:
    from ldm_lab.diffusion.sampling import SamplingOptions, generate
    from ldm_lab.io.model_sources import load_latent_diffusion

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a class-conditional LDM: training checkpoint or exported folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 1.5, 3.0, 5.0])
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--side", type=int, default=32, help="pixels")
    parser.add_argument("--steps", type=int, default=200, help="DDIM steps")
    parser.add_argument("--zoom", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("guidance_grids.png"))
    args = parser.parse_args()
    pipeline = load_latent_diffusion(args.model, "model")
    class_names = pipeline.config.class_names
    labels = [label for label in range(len(class_names)) for _ in range(args.per_class)]
    options = SamplingOptions(num_inference_steps=args.steps, batch_size=len(labels))
    panels = []
    for scale in args.scales:
        images = generate(pipeline, options, len(labels), args.side, args.side, torch.Generator().manual_seed(0),
                          class_labels=labels, guidance_scale=scale)
        title = f"guidance {scale:g}" + (" (unconditional)" if scale == 0 else "")
        panels.append(panel(images, args.per_class, title, args.zoom))
    save_sheet(panels, args.out)
    print(f"rows: {', '.join(class_names)}; written: {args.out}")


if __name__ == "__main__":
    main()
