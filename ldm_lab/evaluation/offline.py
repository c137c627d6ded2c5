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

from ldm_lab.core.atomic import atomic_write
from ldm_lab.evaluation.metrics import ReconstructionMetrics, SampleQuality
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


class InceptionSamples:
    """Samples measured in Inception's embedding: FID against the real images of ``real_batches``, whose
    statistics come from ``reference`` when it exists and are written there when not. Sets of samples are added
    one after the other (``add``, then ``compute``; a new set name starts over, the real statistics stay)."""

    classify = None  # Inception's classes are not the data's

    def __init__(self, fid: FrechetInceptionDistance, real_batches: Iterable[dict[str, torch.Tensor]],
                 reference: Path | None = None):
        fill_reference(fid, real_batches, reference)
        self.fid, self._set = fid, None

    @torch.no_grad()
    def add(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None) -> None:
        """Images in [-1, 1] of the set ``name``."""
        if name != self._set:
            self.fid.reset()  # the last set's samples; reset_real_features=False keeps the real statistics
            self._set = name
        self.fid.update((images.to(self.fid.device) + 1) / 2, real=False)

    def compute(self, name: str) -> dict[str, float]:
        return {"samples": int(self.fid.fake_features_num_samples), "real_images": int(self.fid.real_features_num_samples),
                "fid": float(self.fid.compute())}

    def compute_per_class(self, name: str) -> dict[int, dict[str, float]]:
        return {}


class FloorSamples:
    """Samples measured in another feature network's embedding (:class:`SampleQuality`): FID and precision/recall
    against every second real image of ``real_batches``, beside the data-vs-data floor (the same figures for as many
    of the other real images as there are samples, ``num_samples``), and per class with labels; ``classify``: the
    feature network's class logits, when it tells the data's classes."""

    def __init__(self, quality: SampleQuality, real_batches: Iterable[dict[str, torch.Tensor]], num_samples: int,
                 classify: Callable[[torch.Tensor], torch.Tensor] | None = None):
        embed_real_images(real_batches, quality, num_samples)
        self.quality, self.classify = quality, classify

    @torch.no_grad()
    def add(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None) -> None:
        self.quality.update(images, name, labels)

    def compute(self, name: str) -> dict[str, float]:
        return self.quality.compute(name)

    def compute_per_class(self, name: str) -> dict[int, dict[str, float]]:
        """Only where a class has :attr:`SampleQuality.min_class_samples` samples and held-out images (none without
        labels)."""
        return self.quality.compute_per_class(name) if self.quality.labels[name] else {}


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
