"""Reconstruction metrics over a validation pass: PSNR and SSIM always, LPIPS and rFID when their
weights are present (else one warning saying how to get them)."""

from __future__ import annotations

import logging

import torch
from torchmetrics import MeanMetric
from torchmetrics.image import (
    FrechetInceptionDistance,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
)

from ldm_lab.losses.perceptual import LPIPS
from ldm_lab.weights import MissingWeightsError, find_weights, missing_message

log = logging.getLogger(__name__)


class ReconstructionMetrics:
    """Accumulates metrics of reconstructions against inputs, both in [-1, 1].

    PSNR is the mean of per-image values with data_range 2 (seed 001); SSIM uses data_range 2.
    rFID follows torch-fidelity's Inception and resizing (no antialiasing), the published protocol.
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
    ):
        self.psnr = PeakSignalNoiseRatio(data_range=2.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.lpips_model = lpips_model
        if lpips and lpips_model is None:
            try:
                self.lpips_model = LPIPS(lpips_backbone, vgg16_weights)
            except MissingWeightsError as error:
                log.warning("validation LPIPS is off: %s", error)
        self.lpips_mean = MeanMetric() if lpips and self.lpips_model is not None else None
        self.fid = None
        if rfid:
            path = find_weights("inception", inception_weights)
            if path is None:
                log.warning("validation rFID is off: %s", missing_message("inception", inception_weights))
            else:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=True, antialias=False,
                                                    feature_extractor_weights_path=str(path))

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
            self.fid.update((inputs + 1) / 2, real=True)
            self.fid.update((reconstructions + 1) / 2, real=False)

    def compute(self) -> dict[str, torch.Tensor]:
        values = {"psnr": self.psnr.compute(), "ssim": self.ssim.compute()}
        if self.lpips_mean is not None:
            values["lpips"] = self.lpips_mean.compute()
        if self.fid is not None and self.fid.real_features_num_samples >= 2:
            values["rfid"] = self.fid.compute()
        return values
