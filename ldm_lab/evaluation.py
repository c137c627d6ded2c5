"""Evaluation by the published protocols. Autoencoders: PSNR as the mean (and spread) of per-image
values, SSIM, LPIPS, and rFID with torch-fidelity's Inception and resizing. Diffusion models: FID of
N samples against the real images. The real images' statistics are cached per (data set, split,
resolution)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import FrechetInceptionDistance, StructuralSimilarityIndexMeasure
from tqdm import tqdm

from ldm_lab.losses.perceptual import LPIPS

log = logging.getLogger(__name__)

REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def per_image_psnr(inputs: torch.Tensor, reconstructions: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR of each image, shape (N,): 10 log10(range^2 / MSE) with the MSE over that image's pixels."""
    mse = (inputs.float() - reconstructions.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def make_fid(feature: int | nn.Module = 2048, weights_path: str | None = None) -> FrechetInceptionDistance:
    """FID on images in [0, 1]. With an int, torch-fidelity's Inception-v3 from ``weights_path``, resized as
    torch-fidelity does (no antialiasing, unlike torchmetrics' default), so numbers compare with
    published ones; a module is a stand-in feature network (the tests use a small random one). Real
    statistics survive ``reset`` so a reference can be loaded once and compared many times."""
    if isinstance(feature, int):
        return FrechetInceptionDistance(feature=feature, normalize=True, antialias=False, reset_real_features=False,
                                        feature_extractor_weights_path=weights_path)
    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: getattr(fid, name).detach().cpu().numpy() for name in REFERENCE_STATES})


@torch.no_grad()
def evaluate_reconstructions(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    lpips: LPIPS | None = None,
    fid: FrechetInceptionDistance | None = None,
    reference: Path | None = None,
) -> dict[str, float]:
    """Metrics of ``reconstruct`` over ``batches`` of images in [-1, 1]. The real images' FID statistics
    come from ``reference`` when it exists, and are written there when it does not."""
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0).to(device)
    lpips_mean = MeanMetric().to(device)
    psnrs = []
    have_reference = fid is not None and reference is not None and load_reference(fid, reference)
    for batch in tqdm(batches, desc="evaluating", unit="batch"):
        inputs = batch["pixel_values"].to(device)
        reconstructions = reconstruct(inputs).float().clamp(-1, 1)
        psnrs.append(per_image_psnr(inputs, reconstructions).cpu())
        ssim.update(reconstructions, inputs)
        if lpips is not None:
            lpips_mean.update(lpips.to(device)(reconstructions, inputs))
        if fid is not None:
            if not have_reference:
                fid.update((inputs + 1) / 2, real=True)
            fid.update((reconstructions + 1) / 2, real=False)
    psnr = torch.cat(psnrs)
    results = {"images": len(psnr), "psnr": float(psnr.mean()), "psnr_std": float(psnr.std(unbiased=False)),
               "ssim": float(ssim.compute())}
    if lpips is not None:
        results["lpips"] = float(lpips_mean.compute())
    if fid is not None:
        if reference is not None and not have_reference:
            save_reference(fid, reference)
        results["rfid"] = float(fid.compute())
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
    if not (reference is not None and load_reference(fid, reference)):
        for batch in tqdm(real_batches, desc="real images", unit="batch"):
            fid.update((batch["pixel_values"].to(fid.device) + 1) / 2, real=True)
        if reference is not None:
            save_reference(fid, reference)
    for start in tqdm(range(0, num_samples, batch_size), desc="samples", unit="batch"):
        images = generate(min(batch_size, num_samples - start)).to(fid.device).float().clamp(-1, 1)
        fid.update((images + 1) / 2, real=False)
    return {"samples": num_samples, "real_images": int(fid.real_features_num_samples), "fid": float(fid.compute())}
