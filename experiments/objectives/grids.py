"""The samples of each (denoiser x objective) run side by side, from the same noise, each with its objective's
sampler at the same number of steps: a panel per run, enlarged so a person sees edges (nearest-neighbour, 3x),
written to one PNG.

    .venv/bin/python experiments/objectives/grids.py <run>/checkpoints/last.ckpt ... --titles "UNet, DDPM v" ...
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
    parser.add_argument("models", nargs="+", help="latent diffusion models: training checkpoints or exported folders")
    parser.add_argument("--titles", nargs="+", required=True)
    parser.add_argument("--count", type=int, default=36)
    parser.add_argument("--side", type=int, default=32, help="pixels")
    parser.add_argument("--steps", type=int, default=200, help="sampler steps (ddim or euler)")
    parser.add_argument("--zoom", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    args = parser.parse_args()
    panels = []
    for model_path, title in zip(args.models, args.titles, strict=True):
        options = SamplingOptions(num_inference_steps=args.steps, batch_size=args.count)
        images = generate(load_latent_diffusion(model_path, "model"), options, args.count, args.side, args.side,
                          torch.Generator().manual_seed(0))
        panels.append(panel(images, int(args.count**0.5), title, args.zoom))
    save_sheet(panels, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
