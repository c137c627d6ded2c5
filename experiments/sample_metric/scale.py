"""What the offline sample metric's numbers mean: FID and precision/recall, in the synthetic data's feature
space, of real pictures and of known corruptions of them, each against the same reference, beside the
data-vs-data floor. Every corrupted set is made from pictures the reference has not seen.

    .venv/bin/python experiments/sample_metric/scale.py [--steps 600] [--count 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ldm_lab.evaluation.metrics import SampleQuality
from ldm_lab.evaluation.synthetic_features import render, train_feature_net


def blur(images: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(images, factor).repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="feature network training steps (the default's)")
    parser.add_argument("--count", type=int, default=128, help="pictures per measured set")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    net, r2 = train_feature_net(args.resolution, steps=args.steps)
    trained = time.perf_counter() - start
    side, n = args.resolution, args.count
    reference = render(512, side, seed=100)[0]
    held_out = render(n, side, seed=101)[0]
    unseen = render(n, side, seed=102)[0]
    g = torch.Generator().manual_seed(0)
    sets = {
        "unseen real pictures": unseen,
        "blurred 2x2": blur(unseen, 2),
        "blurred 4x4": blur(unseen, 4),
        "Gaussian noise, std 0.1": (unseen + 0.1 * torch.randn(unseen.shape, generator=g)).clamp(-1, 1),
        "colours shifted by 0.2": (unseen + 0.2).clamp(-1, 1),
        "one picture repeated": unseen[:1].expand(n, -1, -1, -1),
        "flat mean colours": unseen.mean(dim=(2, 3), keepdim=True).expand(-1, -1, side, side),
        "uniform noise": torch.rand(unseen.shape, generator=g) * 2 - 1,
    }
    rows = ["| samples | FID | FID / floor | precision | recall |", "|---|---:|---:|---:|---:|"]
    for name, samples in sets.items():
        quality = SampleQuality(net)
        quality.update(reference, "reference")
        quality.update(held_out, "held_out")
        quality.update(samples, "samples")
        r = quality.compute()
        rows.append(f"| {name} | {r['fid']:.1f} | {r['fid'] / r['floor_fid']:.2f} | {r['precision']:.2f} | "
                    f"{r['recall']:.2f} |")
    floor = f"| floor: {n} held-out real pictures | {r['floor_fid']:.1f} | 1.00 | {r['floor_precision']:.2f} | " \
            f"{r['floor_recall']:.2f} |"
    print(f"trained in {args.steps} steps, {trained:.0f} s; held-out R^2 {r2:.3f}; {side} px, "
          f"reference 512 renders, {n} per set\n")
    print("\n".join([*rows[:2], floor, *rows[2:]]))


if __name__ == "__main__":
    main()
