"""Two PixArt models of the same recipe, one trained on aspect-ratio buckets and one on square center crops,
compared on the same held-out pictures of the three shapes (make_data.py):

- the objective's validation loss (the EMA weights', at uniform timesteps) on each held-out picture whole, at its
  own shape: how well each models square, landscape and portrait pictures (the square model never saw a whole
  landscape or portrait one). Each picture is noised ``--repeats`` times from fixed seeds, the same for both;
- prompt adherence of 32x32 samples of the square held-out pictures' captions at guidance 3 (the prompt reader
  reads squares), and per fact;
- grids of landscape and portrait samples of the same prompts, to look at.

    python experiments/pixart_buckets/compare.py <buckets run> <square run> <data folder> [--out <folder>]

Writes results.json and the grids into --out (default: beside this file).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torchvision.utils import save_image

from ldm_lab.config.schema import register_configs
from ldm_lab.diffusion.pipeline import encode_prompt, predict
from ldm_lab.diffusion.sampling import SamplingOptions, generate
from ldm_lab.evaluation.prompt_adherence import CHOICES, fact_matches, load_reader
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.io.networks import latent_diffusion_of
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.tasks.trainer import build_datamodule

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ["data=folder", "data.source.caption_extension=.txt", "data.source.index_workers=0", "data.resolution=32",
        "data.num_val=192"]  # measure.sh's, and its buckets
BUCKETS = ["+data/buckets=novelai", "data.buckets.max_area=1536", "data.buckets.min_side=32",
           "data.buckets.max_side=48", "data.buckets.step=16", "data.buckets.base_side=32",
           "data.buckets.max_ar_error=0.5"]


def datamodule(folder: Path):
    """The held-out pictures at their own shapes, each with its first caption."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*DATA, f"data.source.root={folder}", *BUCKETS,
                                           "paths.output_dir=/tmp/pixart_buckets_compare"])
    data = build_datamodule(cfg, 8)
    data.setup("validate")
    return data


@torch.no_grad()
def validation_losses(run: Path, data, repeats: int) -> dict[str, float]:
    """The mean validation loss of the run's EMA weights per picture shape (WxH)."""
    networks = latent_diffusion_of(read_checkpoint(run / "checkpoints" / "last.ckpt"))
    first_stage = FrozenAutoencoder(networks.vae)
    sums, counts = defaultdict(float), defaultdict(int)
    for index, batch in enumerate(data.val_dataloader()):
        moments = first_stage.moments(batch["pixel_values"])
        condition = encode_prompt(networks.tokenizer, networks.text_encoder, list(batch["captions"]))
        shape = f"{batch['pixel_values'].shape[3]}x{batch['pixel_values'].shape[2]}"
        for repeat in range(repeats):
            generator = torch.Generator().manual_seed(1000 * index + repeat)
            latents = first_stage.sample(moments, generator) * networks.latent_scale
            loss = networks.objective.loss(functools.partial(predict, networks.denoiser, **condition), latents,
                                           generator)
            sums[shape] += float(loss) * len(latents)
            counts[shape] += len(latents)
    return {shape: sums[shape] / counts[shape] for shape in sorted(sums)}


def square_prompts(data, count: int) -> list[str]:
    """The first captions of up to ``count`` held-out square pictures."""
    held_out = [i for i, is_val in enumerate(data.is_val) if is_val and data.index.widths[i] == data.index.heights[i]]
    return [data.index.captions[i][0] for i in held_out[:count]]


def samples(run: Path, prompts: list[str], height: int, width: int) -> torch.Tensor:
    pipeline = load_latent_diffusion(run / "checkpoints" / "last.ckpt", "model")
    return generate(pipeline, SamplingOptions(num_inference_steps=50), len(prompts), height, width,
                    torch.Generator().manual_seed(0), guidance_scale=3.0, prompts=prompts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("buckets", type=Path)
    parser.add_argument("square", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and the grids go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = datamodule(args.data)
    prompts = square_prompts(data, args.samples)
    reader, _ = load_reader(ROOT / "data" / "fid_reference", 32)
    results = {"held out": dict(Counter(f"{data.index.widths[i]}x{data.index.heights[i]}"
                                        for i, held_out in enumerate(data.is_val) if held_out))}
    for name, run in (("buckets", args.buckets), ("square", args.square)):
        losses = validation_losses(run, data, args.repeats)
        matches = fact_matches(reader, samples(run, prompts, 32, 32), prompts)
        results[name] = {"validation loss by shape": losses, "square samples' prompt adherence":
                         float(matches.all(dim=1).float().mean()),
                         "by fact": dict(zip(CHOICES, matches.float().mean(dim=0).tolist(), strict=True))}
        for width, height in ((48, 32), (32, 48)):
            save_image(samples(run, prompts[:8], height, width) / 2 + 0.5,
                       args.out / f"{name}_{width}x{height}.png", nrow=8, padding=1)
        print(name, json.dumps(results[name]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
