"""Data-layer benchmark: bucket assignment and one epoch of batches for 1,000,000 image sizes, against
plain per-image Python loops doing the same work in the same run; the loader's images per second; reading
the latent cache with its shards kept open against opening the shard for every item.

    make bench        (or: python experiments/bench/bench_data.py [--images N])

Writes experiments/bench/results/data.md. Every figure is the median of repeated runs after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm_lab.data.buckets import BucketBatchSampler, assign_buckets, bucket_resolutions
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.latent_cache import LatentCache, read_latents
from ldm_lab.data.synthetic import SyntheticSource

RESULTS = Path(__file__).resolve().parent / "results" / "data.md"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def python_assign(widths, heights, resolutions, max_ar_error):
    """The per-image loop: nearest bucket in log aspect, pruned above max_ar_error."""
    bucket_aspects = [math.log(w / h) for h, w in resolutions]
    out = []
    for width, height in zip(widths, heights, strict=True):
        aspect = math.log(width / height)
        best, best_error = -1, float("inf")
        for b, bucket_aspect in enumerate(bucket_aspects):
            error = abs(aspect - bucket_aspect)
            if error < best_error:
                best, best_error = b, error
        out.append(best if best_error <= max_ar_error else -1)
    return out


def python_epoch(buckets, batch_size, seed):
    """Seed 002's per-batch loop: shuffled per-bucket lists, a weighted bucket choice for every batch."""
    rng = np.random.default_rng(seed)
    kept = [i for i, b in enumerate(buckets) if b >= 0]
    order = rng.permutation(kept).tolist()
    order = order[: len(order) - len(order) % batch_size]
    lists: dict[int, list[int]] = {}
    for i in order:
        lists.setdefault(int(buckets[i]), []).append(i)
    leftovers = []
    for b in list(lists):
        extra = len(lists[b]) % batch_size
        if extra:
            leftovers += lists[b][len(lists[b]) - extra:]
            lists[b] = lists[b][: len(lists[b]) - extra]
    if leftovers:
        lists[-1] = leftovers
    batches = []
    while lists:
        keys = list(lists)
        sizes = np.array([len(lists[k]) for k in keys], dtype=np.float64)
        key = keys[rng.choice(len(keys), p=sizes / sizes.sum())]
        batches.append(lists[key][:batch_size])
        lists[key] = lists[key][batch_size:]
        if not lists[key]:
            del lists[key]
    return batches


def loader_images_per_second(num_workers: int, root: Path, batches: int = 30) -> float:
    dm = ImageDataModule(SyntheticSource(root, num_images=512, min_side=64, max_side=192), resolution=64,
                         batch_size=8, num_val=8, num_workers=num_workers, downsample_factor=8)
    dm.prepare_data()
    dm.setup("fit")

    loader = dm.train_dataloader()  # persistent workers: started once, in the warm-up pass

    def one_pass():
        for i, _ in enumerate(loader):
            if i + 1 == batches:
                break

    return batches * 8 / median_seconds(one_pass, repeats=3)


def latent_read_microseconds(root: Path, count: int = 1024) -> tuple[float, float]:
    """Microseconds per item to read ``count`` 8x16x16 moments (the quickstart's) from one cache shard (1024:
    LatentCache's shard size): with the shard kept open (CachedLatents) and opened for every item."""
    cache = LatentCache(root, "bench" * 4, shard_size=count)
    for i in range(count):
        cache.add(str(i), torch.randn(8, 16, 16))
    shard = cache.shards["0"]
    handles: dict = {}
    kept_open = median_seconds(lambda: [read_latents(shard, str(i), handles) for i in range(count)], repeats=5)
    reopened = median_seconds(lambda: [read_latents(shard, str(i)) for i in range(count)], repeats=3)
    return kept_open / count * 1e6, reopened / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    widths = rng.integers(200, 3000, args.images)
    heights = rng.integers(200, 3000, args.images)
    resolutions = bucket_resolutions(512 * 768, 256, 1024, 64, base_side=512)
    assert python_assign(widths[:1000].tolist(), heights[:1000].tolist(), resolutions, 0.25) == \
        assign_buckets(widths[:1000], heights[:1000], resolutions, 0.25).bucket.tolist()

    fast_assign = median_seconds(lambda: assign_buckets(widths, heights, resolutions, 0.25), repeats=5)
    slow_assign = median_seconds(lambda: python_assign(widths.tolist(), heights.tolist(), resolutions, 0.25), 1)
    buckets = assign_buckets(widths, heights, resolutions, 0.25).bucket
    sampler = BucketBatchSampler(buckets, resolutions, 8, (512, 512), seed=0)
    fast_epoch = median_seconds(lambda: sampler.epoch_batches(0), repeats=5)
    slow_epoch = median_seconds(lambda: python_epoch(buckets, 8, 0), repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        loader = {workers: loader_images_per_second(workers, Path(tmp)) for workers in (0, 2)}
        kept_open, reopened = latent_read_microseconds(Path(tmp) / "latents")

    lines = [
        "# Data-layer benchmark",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}.",
        f"Command: `python experiments/bench/bench_data.py --images {args.images}` (`make bench`).",
        "",
        f"| work on {args.images:,} image sizes | ldm_lab (s) | per-image Python loop (s) | speed-up |",
        "|---|---:|---:|---:|",
        f"| assign to NovelAI's 19 buckets | {fast_assign:.3f} | {slow_assign:.3f} | {slow_assign / fast_assign:.1f}x |",
        f"| draw one epoch of batches (batch 8) | {fast_epoch:.3f} | {slow_epoch:.3f} | {slow_epoch / fast_epoch:.1f}x |",
        "",
        "| loader (synthetic PNG/JPEG/WebP, 64x64 crops, batch 8) | images/s |",
        "|---|---:|",
        *[f"| num_workers={w} | {ips:.0f} |" for w, ips in loader.items()],
        "",
        "| latent cache: one item (8x16x16 moments) of a 1024-item shard | us per item |",
        "|---|---:|",
        f"| shard kept open (CachedLatents) | {kept_open:.1f} ({reopened / kept_open:.0f}x faster) |",
        f"| shard opened for every item | {reopened:.1f} |",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
