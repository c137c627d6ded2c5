"""A bare training loop of the quickstart's KL autoencoder (diffusers AutoencoderKL, L1 on the latent's
mode, AdamW, no EMA, no schedule, no GAN) on the synthetic data: how fast a first-stage shape learns,
without the stage's machinery. Prints validation PSNR every 200 steps.

    .venv/bin/python experiments/quickstart_recipes/ae_probe.py --lr 3e-4 --steps 1000 --resolution 32 --levels 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir

from ldm_lab.config.schema import register_configs
from ldm_lab.tasks.trainer import build_datamodule

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--levels", type=int, default=2, help="down blocks: 2 is f2, 3 is f4")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", "paths.output_dir=/tmp/ae_probe", "data.num_workers=0",
                                           f"data.resolution={args.resolution}", f"data.batch_size={args.batch_size}"])
    datamodule = build_datamodule(cfg, 2 ** (args.levels - 1))
    datamodule.prepare_data()
    datamodule.setup("fit")
    val = torch.cat([batch["pixel_values"] for batch in datamodule.val_dataloader()])
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * args.levels,
                        up_block_types=["UpDecoderBlock2D"] * args.levels,
                        block_out_channels=[32, 64, 64, 64][: args.levels], layers_per_block=1, norm_num_groups=16,
                        latent_channels=4, sample_size=args.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.01)

    def psnr() -> float:
        with torch.no_grad():
            mse = (vae.decode(vae.encode(val).latent_dist.mode()).sample.clamp(-1, 1) - val).pow(2).mean(dim=(1, 2, 3))
        return float((10 * torch.log10(4 / mse)).mean())

    step, start, trajectory = 0, time.perf_counter(), []
    while step < args.steps:
        for batch in datamodule.train_dataloader():
            inputs = batch["pixel_values"]
            loss = (vae.decode(vae.encode(inputs).latent_dist.mode()).sample - inputs).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 200 == 0:
                trajectory.append(f"{step}: {psnr():.2f} dB ({time.perf_counter() - start:.0f} s)")
            if step >= args.steps:
                break
    print(f"lr {args.lr}, {args.resolution} px, f{2 ** (args.levels - 1)}, batch {args.batch_size}: " + ", ".join(trajectory))


if __name__ == "__main__":
    main()
