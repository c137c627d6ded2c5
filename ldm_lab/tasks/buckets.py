"""task=buckets: a look at the data before training on it (seed 002's bucket table and a histogram).

    python run.py task=buckets data=folder data.source.root=/path/to/images +data/buckets=novelai
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm_lab.data.buckets import assign_buckets
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.index import ImageIndex
from ldm_lab.tasks import model_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def bucket_table(datamodule: ImageDataModule, index: ImageIndex) -> tuple[str, list[dict]]:
    """Per bucket: resolution, aspect, images, share, mean |log aspect| error, images pruned near it."""
    a = assign_buckets(index.widths, index.heights, datamodule.resolutions, datamodule.max_ar_error,
                       datamodule.buckets is not None and datamodule.buckets.no_upscale)
    kept = a.bucket >= 0
    rows = []
    for b, (height, width) in enumerate(datamodule.resolutions):
        members = a.bucket == b
        rows.append({"resolution": f"{width}x{height}", "aspect": width / height, "images": int(members.sum()),
                     "share": members.sum() / max(1, kept.sum()),
                     "mean_error": float(a.error[members].mean()) if members.any() else float("nan"),
                     "pruned": int((a.too_extreme & (a.nearest == b)).sum())})
    lines = ["| bucket | aspect | images | share | mean log-aspect error | pruned |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['resolution']} | {r['aspect']:.3f} | {r['images']} | {r['share']:.1%} | {r['mean_error']:.4f} "
              f"| {r['pruned']} |" for r in rows]
    lines.append(f"| all | | {int(kept.sum())} | 100% | {a.error[kept].mean():.4f} | {int(a.too_extreme.sum())} |")
    if a.too_small.any():
        lines.append(f"\n{int(a.too_small.sum())} images fit no bucket (no-upscale mode).")
    skipped = "".join(f"\n{count} files skipped: {reason}" for reason, count in index.skipped.most_common())
    return "\n".join(lines) + skipped, rows


def plot_buckets(rows: list[dict], aspects: np.ndarray, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(range(len(rows)), [r["images"] for r in rows], color="tab:blue")
    left.set_xticks(range(len(rows)), [r["resolution"] for r in rows], rotation=70, fontsize=8)
    left.set_ylabel("images")
    left.set_title("images per bucket")
    right.hist(np.log2(aspects), bins=60, color="tab:gray")
    for r in rows:
        right.axvline(np.log2(r["aspect"]), color="tab:red", linewidth=0.8)
    right.set_xlabel("log2(width / height); red: buckets")
    right.set_title("image aspect ratios")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(cfg: DictConfig) -> Path:
    # what the buckets must divide by, read from the model config without building the model
    downsample_factor = model_config.downsample_factor(cfg.model)
    datamodule: ImageDataModule = instantiate(cfg.data, downsample_factor=downsample_factor)
    datamodule.prepare_data()
    index = datamodule.source.index(datamodule.cache_dir)
    table, rows = bucket_table(datamodule, index)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "buckets.md").write_text(table + "\n")
    plot_buckets(rows, index.widths / index.heights, out / "buckets.png")
    log.info("buckets of %s:\n%s", datamodule.source.name, table)
    log.info("table: %s, histogram: %s", out / "buckets.md", out / "buckets.png")
    return out / "buckets.png"
