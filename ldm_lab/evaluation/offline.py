"""Evaluation by the published protocols. Autoencoders: PSNR as the mean (and spread) of per-image
values, SSIM, LPIPS, and rFID with torch-fidelity's Inception and resizing, by the metrics validation
uses (ldm_lab/evaluation/metrics.py). Diffusion models: FID of N samples against the real images, whose Inception
statistics are cached per (data set, split, resolution); or, offline, FID and precision/recall in another
feature network's embedding beside their data-vs-data floor."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image import FrechetInceptionDistance
from tqdm import tqdm

from ldm_lab.evaluation.metrics import ReconstructionMetrics, SampleQuality
from ldm_lab.io.atomic import atomic_write
from ldm_lab.losses.perceptual import LPIPS

log = logging.getLogger(__name__)

REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def load_reference(fid: FrechetInceptionDistance, path: Path) -> bool:
    """Put cached real-image statistics into ``fid``; False when there is no cache yet."""
    if not path.is_file():
        return False
    with np.load(path) as saved:
        for name in REFERENCE_STATES:
            state = getattr(fid, name)
            setattr(fid, name, torch.as_tensor(saved[name], dtype=state.dtype, device=state.device))
    return True


def save_reference(fid: FrechetInceptionDistance, path: Path) -> None:
    """Written whole (jobs sharing ``evaluate.reference_dir`` may write it at once: the same numbers)."""
    states = {name: getattr(fid, name).detach().cpu().numpy() for name in REFERENCE_STATES}
    atomic_write(path, lambda file: np.savez(file, **states))


@torch.no_grad()
def evaluate_reconstructions(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    lpips: LPIPS | None = None,
    fid: FrechetInceptionDistance | None = None,
    reference: Path | None = None,
) -> dict[str, float]:
    """Metrics of ``reconstruct`` over ``batches`` of images in [-1, 1], by validation's own stack
    (:class:`~ldm_lab.evaluation.metrics.ReconstructionMetrics`) plus the spread of per-image PSNR. The real images'
    FID statistics come from ``reference`` when it exists, and are written there when it does not."""
    metrics = ReconstructionMetrics(lpips=lpips is not None, rfid=False, lpips_model=lpips, fid=fid).to(device)
    metrics.real_statistics_known = fid is not None and reference is not None and load_reference(fid, reference)
    for batch in tqdm(batches, desc="evaluating", unit="batch"):
        inputs = batch["pixel_values"].to(device)
        metrics.update(inputs, reconstruct(inputs))
    psnr = metrics.per_image_psnr()
    results = {"images": len(psnr), "psnr_std": float(psnr.std(unbiased=False))}
    results.update({name: float(value) for name, value in metrics.compute().items()})
    if fid is not None and reference is not None and not metrics.real_statistics_known:
        save_reference(fid, reference)
    return results


@torch.no_grad()
def evaluate_samples(
    generate: Callable[[int], torch.Tensor],
    num_samples: int,
    batch_size: int,
    real_batches: Iterable[dict[str, torch.Tensor]],
    fid: FrechetInceptionDistance,
    reference: Path | None = None,
) -> dict[str, float]:
    """FID of ``num_samples`` images from ``generate(n)`` (n images in [-1, 1]) against the real images of
    ``real_batches``, whose statistics come from ``reference`` when it exists and are written there when not."""
    fill_reference(fid, real_batches, reference)
    for images in _samples(generate, num_samples, batch_size):
        fid.update((images.to(fid.device) + 1) / 2, real=False)
    return {"samples": num_samples, "real_images": int(fid.real_features_num_samples), "fid": float(fid.compute())}


@torch.no_grad()
def fill_reference(fid: FrechetInceptionDistance, real_batches: Iterable[dict[str, torch.Tensor]],
                   reference: Path | None = None) -> None:
    """The real images' statistics in ``fid``: from ``reference`` when it exists, else from ``real_batches``
    (and then written there)."""
    if reference is not None and load_reference(fid, reference):
        return
    for batch in tqdm(real_batches, desc="real images", unit="batch"):
        fid.update((batch["pixel_values"].to(fid.device) + 1) / 2, real=True)
    if reference is not None:
        save_reference(fid, reference)


@torch.no_grad()
def evaluate_samples_against_floor(
    generate: Callable[[int], torch.Tensor],
    num_samples: int,
    batch_size: int,
    real_batches: Iterable[dict[str, torch.Tensor]],
    quality: SampleQuality,
) -> dict[str, float]:
    """FID and precision/recall of ``num_samples`` images from ``generate(n)`` against every second real
    image of ``real_batches``, and the same figures for as many of the other real images (the floor)."""
    embed_real_images(real_batches, quality, num_samples)
    for images in _samples(generate, num_samples, batch_size):
        quality.update(images, "samples")
    return quality.compute()


def embed_real_images(real_batches: Iterable[dict[str, torch.Tensor]], quality: SampleQuality,
                      num_samples: int) -> None:
    """The reference and held-out parts of ``quality`` (:func:`split_real_images`), with their classes when the
    batches carry them; a warning when fewer held-out images than ``num_samples`` make the floor."""
    held_out_count = 0
    for reference, held_out in split_real_images(tqdm(real_batches, desc="real images", unit="batch")):
        quality.update(reference["pixel_values"], "reference", reference.get("class_labels"))
        if len(held_out["pixel_values"]):
            quality.update(held_out["pixel_values"], "held_out", held_out.get("class_labels"))
        held_out_count += len(held_out["pixel_values"])
    if held_out_count < num_samples:
        log.warning("the floor uses %d held-out real images against %d samples: its FID is biased upwards by the "
                    "smaller count; evaluate.num_samples=%d matches them", held_out_count, num_samples, held_out_count)


def split_real_images(real_batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[tuple[dict, dict]]:
    """(reference, held-out) parts of each batch (its pixels and, for labelled data, classes): every second
    real image is held out, to stand in for samples in the data-vs-data floor; the others are the reference
    both are measured against."""
    seen = 0
    for batch in real_batches:
        held_out = (seen + torch.arange(len(batch["pixel_values"]))) % 2 == 1
        seen += len(held_out)
        parts = [{key: batch[key][mask] for key in ("pixel_values", "class_labels") if key in batch}
                 for mask in (~held_out, held_out)]
        yield parts[0], parts[1]


def _samples(generate: Callable[[int], torch.Tensor], num_samples: int, batch_size: int):
    for start in tqdm(range(0, num_samples, batch_size), desc="samples", unit="batch"):
        yield generate(min(batch_size, num_samples - start)).float().clamp(-1, 1)
