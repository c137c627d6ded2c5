"""Validation metrics on images with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_lab.evaluation.metrics import ReconstructionMetrics


def test_psnr_is_the_mean_of_per_image_values_on_range_two():
    metrics = ReconstructionMetrics(lpips=False, rfid=False)
    inputs = torch.zeros(2, 3, 16, 16)
    reconstructions = torch.stack([torch.full((3, 16, 16), 0.1), torch.full((3, 16, 16), 0.2)])
    metrics.update(inputs, reconstructions)
    values = metrics.compute()
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2  # not 10 log10(4 / 0.025)
    assert values["psnr"].item() == pytest.approx(expected, rel=1e-5)
    assert set(values) == {"psnr", "ssim"}


def test_identical_images_have_ssim_one_and_lpips_zero():
    metrics = ReconstructionMetrics(lpips=True, rfid=False, lpips_backbone="random")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    metrics.update(x, x)
    values = metrics.compute()
    assert values["ssim"].item() == pytest.approx(1.0, abs=1e-4)
    assert values["lpips"].item() == pytest.approx(0.0, abs=1e-6)
    metrics.reset()
    metrics.update(x, x.flip(-1))
    assert metrics.compute()["lpips"].item() > 0


def test_reconstructions_are_clamped_before_scoring():
    metrics = ReconstructionMetrics(lpips=False, rfid=False)
    x = torch.ones(1, 3, 8, 8)
    metrics.update(x, x * 5)  # out of range, but equal to the input once clamped
    assert math.isinf(metrics.compute()["psnr"].item())


def test_missing_weights_switch_metrics_off_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metrics = ReconstructionMetrics(lpips=True, rfid=True)
    assert metrics.lpips_mean is None and metrics.fid is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "LPIPS is off" in warnings[0] and "vgg16-397923af.pth" in warnings[0]
    assert "rFID is off" in warnings[1] and "weights-inception-2015-12-05-6726825d.pth" in warnings[1]
