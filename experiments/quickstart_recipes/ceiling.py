"""The first stage's ceiling: the sample metric of its reconstructions, what a perfect LDM in its latent
space would score. Half the training images (every second one) are the reference, as in task=evaluate;
the first --num-images of the other half, reconstructed, are the samples, and as they are the
data-vs-data floor (the same images). An LDM's samples scored by as many images cannot beat this figure.

    .venv/bin/python experiments/quickstart_recipes/ceiling.py <quickstart run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ldm_lab.config.schema import register_configs
from ldm_lab.evaluation.metrics import SampleQuality
from ldm_lab.evaluation.offline import split_real_images
from ldm_lab.evaluation.synthetic_features import load_feature_net
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.tasks.trainer import build_datamodule

ROOT = Path(__file__).resolve().parents[2]


def first_stage_ceiling(first_stage: Path, num_images: int = 64, overrides: list[str] = ()) -> dict:
    """The sample metric (FID, precision, recall and their floors) of ``first_stage``'s reconstructions of the first
    ``num_images`` held-out images; ``overrides`` of experiment=quickstart_ldm choose the data (and seed)."""
    torch.set_num_threads(2)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart_ldm", "task=evaluate", *overrides])
    autoencoder = load_first_stage(first_stage, "first_stage")
    datamodule = build_datamodule(cfg, autoencoder.downsample_factor)
    datamodule.prepare_data()
    datamodule.setup("validate")
    feature_net, described = load_feature_net(cfg.evaluate.reference_dir, datamodule.resolution)
    quality = SampleQuality(feature_net)
    with torch.no_grad():
        for reference, held_out in split_real_images(datamodule.reference_dataloader()):
            quality.update(reference["pixel_values"], "reference")
            quality.update(held_out["pixel_values"], "held_out")
            wanted = held_out["pixel_values"][: num_images - sum(map(len, quality.embeddings["samples"]))]
            if len(wanted):
                quality.update(autoencoder.reconstruct(wanted).clamp(-1, 1), "samples")
    return {"described": described, **quality.compute()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first_stage", type=Path, help="an autoencoder's checkpoint or exported folder")
    parser.add_argument("--num-images", type=int, default=64, help="as task=evaluate's evaluate.num_samples")
    parser.add_argument("overrides", nargs="*", help="overrides of experiment=quickstart_ldm (the data)")
    args = parser.parse_args()
    r = first_stage_ceiling(args.first_stage, args.num_images, args.overrides)
    print(f"{r['described']}\nreconstructions of {r['samples']} held-out images: FID {r['fid']:.2f} against a floor of "
          f"{r['floor_fid']:.2f} ({r['fid'] / r['floor_fid']:.2f}x); precision {r['precision']:.2f}, recall "
          f"{r['recall']:.2f} (floor: {r['floor_precision']:.2f}, {r['floor_recall']:.2f})")

if __name__ == "__main__":
    main()
