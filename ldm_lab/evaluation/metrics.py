"""Reconstruction metrics: PSNR and SSIM always, LPIPS and rFID when their weights are present (else one
warning saying how to get them). The one stack behind validation (val/*) and task=evaluate, so the two
cannot drift."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import (
    FrechetInceptionDistance,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
)

from ldm_lab.core.weights import MissingWeightsError, find_weights, missing_message
from ldm_lab.losses.perceptual import LPIPS

log = logging.getLogger(__name__)


def make_fid(feature: int | nn.Module = 2048, weights_path: str | None = None) -> FrechetInceptionDistance:
    """FID on images in [0, 1]. With an int, torch-fidelity's Inception-v3 from ``weights_path``, resized as
    torch-fidelity does (no antialiasing, unlike torchmetrics' default), so numbers compare with
    published ones; a module is a stand-in feature network (the tests use a small random one). Real
    statistics survive ``reset`` so a reference can be loaded once and compared many times."""
    if isinstance(feature, int):
        return FrechetInceptionDistance(feature=feature, normalize=True, antialias=False, reset_real_features=False,
                                        feature_extractor_weights_path=weights_path)
    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)


class ReconstructionMetrics:
    """Accumulates metrics of reconstructions against inputs, both in [-1, 1].

    PSNR is the mean of per-image values with data_range 2 (seed 001); SSIM uses data_range 2.
    rFID follows torch-fidelity's Inception and resizing (no antialiasing), the published protocol.
    ``lpips_model`` and ``fid`` may be given ready-made; ``notes`` says what is off, why, and which of the
    ``switches`` keys (``model.metrics`` in training, ``evaluate`` in task=evaluate) does without it. With
    ``real_statistics_known`` (a cached reference loaded into ``fid``) inputs are not fed to the FID.
    Not an nn.Module on purpose: its frozen networks stay out of the training checkpoints.
    """

    def __init__(
        self,
        lpips: bool = True,
        rfid: bool = True,
        vgg16_weights: str | None = None,
        inception_weights: str | None = None,
        lpips_backbone: str = "pretrained",
        lpips_model: LPIPS | None = None,
        fid: FrechetInceptionDistance | None = None,
        switches: str = "model.metrics",
    ):
        self.psnr = PeakSignalNoiseRatio(data_range=2.0, reduction="none", dim=(1, 2, 3))  # per image
        self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.notes: list[str] = []
        self.lpips_model = lpips_model
        if lpips and lpips_model is None:
            try:
                self.lpips_model = LPIPS(lpips_backbone, vgg16_weights)
            except MissingWeightsError as error:
                self._off(f"LPIPS is off: {str(error).rstrip('.')}, or do without it: {switches}.lpips=false.")
        self.lpips_mean = MeanMetric() if lpips and self.lpips_model is not None else None
        self.fid = fid
        if rfid and fid is None:
            path = find_weights("inception", inception_weights)
            if path is None:
                self._off(f"rFID is off: {missing_message('inception', inception_weights, f'{switches}.rfid=false')}")
            else:
                self.fid = make_fid(2048, str(path))
        self.real_statistics_known = False

    def _off(self, note: str) -> None:
        self.notes.append(note)
        log.warning("validation %s", note)

    def _metrics(self):
        return [m for m in (self.psnr, self.ssim, self.lpips_mean, self.fid, self.lpips_model) if m is not None]

    def to(self, device: torch.device) -> ReconstructionMetrics:
        for metric in self._metrics():
            metric.to(device)
        return self

    def reset(self) -> None:
        for metric in self._metrics():
            if hasattr(metric, "reset"):
                metric.reset()

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
        inputs = inputs.float()
        reconstructions = reconstructions.float().clamp(-1.0, 1.0)
        self.psnr.update(reconstructions, inputs)
        self.ssim.update(reconstructions, inputs)
        if self.lpips_mean is not None:
            self.lpips_mean.update(self.lpips_model(reconstructions, inputs))
        if self.fid is not None:
            if not self.real_statistics_known:
                self.fid.update((inputs + 1) / 2, real=True)
            self.fid.update((reconstructions + 1) / 2, real=False)

    def per_image_psnr(self) -> torch.Tensor:
        """PSNR of every image seen since the last reset, shape (N,)."""
        return self.psnr.compute().reshape(-1)

    def compute(self) -> dict[str, torch.Tensor]:
        values = {"psnr": self.per_image_psnr().mean(), "ssim": self.ssim.compute()}
        if self.lpips_mean is not None:
            values["lpips"] = self.lpips_mean.compute()
        if self.fid is not None and self.fid.real_features_num_samples >= 2 and self.fid.fake_features_num_samples >= 2:
            values["rfid"] = self.fid.compute()
        return values


class _Embeddings(nn.Module):
    """Hands FrechetInceptionDistance embeddings computed elsewhere, so FID is torchmetrics' own computation."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of ``fake`` embeddings inside
    the union of the real ones' k-nearest-neighbour balls (fidelity), and of ``real`` inside the fake
    ones' (coverage)."""
    def inside(support: torch.Tensor, queries: torch.Tensor) -> float:
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # k + 1: each point is its own 0
        return float((torch.cdist(queries, support) <= radii).any(dim=1).float().mean())

    return inside(real, fake), inside(fake, real)


class SampleQuality:
    """FID and precision/recall of samples against reference images in one feature network's embedding,
    with the data-vs-data floor: the same figures for as many held-out real images as there are samples
    (what a perfect model would score with this many images). Parts: ``reference``, ``held_out`` and any
    named set of samples (``samples``, or one per guidance scale); with labels, the same per class."""

    def __init__(self, feature_net: nn.Module, k: int = 3):
        self.feature_net = feature_net.eval()
        self.k = k
        self.embeddings: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.labels: dict[str, list[torch.Tensor]] = defaultdict(list)

    @torch.no_grad()
    def update(self, images: torch.Tensor, part: str, labels: torch.Tensor | None = None) -> None:
        """Images in [-1, 1] of one part (embedded on the CPU), and their classes when the data has them."""
        self.embeddings[part].append(self.feature_net(images.detach().cpu().float().clamp(-1, 1)).double())
        if labels is not None:
            self.labels[part].append(labels.cpu())

    @property
    def min_class_samples(self) -> int:
        """A class's figures need this many samples and held-out images: twice the embedding's dimension (a
        covariance from fewer is mostly noise); 128 for the synthetic features, 4096 for Inception's."""
        return 2 * torch.cat(self.embeddings["reference"]).shape[1]

    def compute(self, samples: str = "samples") -> dict[str, float]:
        return self._figures(*(torch.cat(self.embeddings[part]) for part in ("reference", samples, "held_out")))

    def compute_per_class(self, samples: str = "samples") -> dict[int, dict[str, float]]:
        """:meth:`compute` for each class with at least :attr:`min_class_samples` samples and held-out images."""
        parts = ("reference", samples, "held_out")
        embeddings = [torch.cat(self.embeddings[part]) for part in parts]
        labels = [torch.cat(self.labels[part]) for part in parts]
        results = {}
        for label in labels[1].unique().tolist():
            chosen = [e[lab == label] for e, lab in zip(embeddings, labels, strict=True)]
            if min(len(chosen[1]), len(chosen[2])) >= self.min_class_samples:
                results[label] = self._figures(*chosen)
        return results

    def _figures(self, reference: torch.Tensor, samples: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
        if len(held_out) > len(samples):  # spread over all: they come in index order (a folder of classes: by class)
            held_out = held_out[torch.linspace(0, len(held_out) - 1, len(samples)).round().long()]
        results = {"samples": len(samples), "reference_images": len(reference), "held_out_images": len(held_out)}
        for prefix, embeddings in (("", samples), ("floor_", held_out)):
            fid = FrechetInceptionDistance(feature=_Embeddings(reference.shape[1]))
            fid.update(reference, real=True)
            fid.update(embeddings, real=False)
            precision, recall = precision_recall(reference.float(), embeddings.float(), self.k)
            results.update({f"{prefix}fid": float(fid.compute()), f"{prefix}precision": precision,
                            f"{prefix}recall": recall})
        return results
