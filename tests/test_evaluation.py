"""Offline evaluation: PSNR/SSIM on known images, FID behaviour with a stand-in feature network,
reference statistics reused from the cache, and task=evaluate end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ldm_lab.evaluation.metrics import ReconstructionMetrics, make_fid
from ldm_lab.evaluation.offline import evaluate_reconstructions


def test_per_image_psnr_matches_hand_computed_values_in_validation_and_evaluation():
    """One metrics stack: validation's ReconstructionMetrics and task=evaluate give the same per-image PSNR."""
    batches = [{"pixel_values": torch.zeros(1, 3, 8, 8)}, {"pixel_values": torch.zeros(1, 3, 8, 8)}]
    errors = iter([0.1, -0.2])
    reconstruct = lambda x: torch.full_like(x, next(errors))  # noqa: E731
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    metrics = ReconstructionMetrics(lpips=False, rfid=False)
    for batch, error in zip(batches, (0.1, -0.2), strict=True):
        metrics.update(batch["pixel_values"], torch.full_like(batch["pixel_values"], error))
    assert metrics.per_image_psnr().tolist() == pytest.approx(expected, rel=1e-5)
    results = evaluate_reconstructions(reconstruct, batches, torch.device("cpu"))
    assert results["psnr"] == pytest.approx(float(metrics.compute()["psnr"]), rel=1e-6)
    assert results["psnr_std"] == pytest.approx(abs(expected[0] - expected[1]) / 2, rel=1e-5)


class StandIn(nn.Module):
    """A small random feature network standing in for Inception: images in [0, 1] -> (N, 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.net(images)


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(8, 3, 32, 32, generator=g) * 2 - 1} for _ in range(n)]


def test_fid_of_a_set_against_itself_is_about_zero_and_grows_with_noise():
    values = []
    for noise in (0.0, 0.2, 0.6):
        def reconstruct(x, noise=noise):
            return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        fid = make_fid(StandIn())
        values.append(evaluate_reconstructions(reconstruct, _batches(), torch.device("cpu"), fid=fid)["rfid"])
    assert abs(values[0]) < 1e-3
    assert values[0] < values[1] < values[2]


def test_reference_statistics_are_computed_once_and_reused(tmp_path):
    reference = tmp_path / "ref.npz"
    extractor = StandIn()
    fid = make_fid(extractor)
    extractor.calls = 0  # torchmetrics probes the network once to size its features
    first = evaluate_reconstructions(lambda x: x * 0.9, _batches(), torch.device("cpu"), fid=fid, reference=reference)
    assert reference.is_file() and extractor.calls == 12  # real and reconstructed batches
    extractor = StandIn()
    fid = make_fid(extractor)
    extractor.calls = 0
    second = evaluate_reconstructions(lambda x: x * 0.9, _batches(), torch.device("cpu"), fid=fid, reference=reference)
    assert extractor.calls == 6  # reconstructions only: the real statistics came from the cache
    assert second["rfid"] == pytest.approx(first["rfid"], rel=1e-5)


def test_evaluate_task_on_an_export_reports_what_needs_no_weights(compose_cfg, tmp_path, monkeypatch):
    from ldm_lab.tasks import evaluate, train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    train.run(compose_cfg(["max_steps=2", "val_every_n_steps=2"]))
    cfg = compose_cfg(["task=evaluate", f"evaluate.model={tmp_path / 'run' / 'export'}",
                       f"paths.output_dir={tmp_path / 'eval'}"])
    results = evaluate.run(cfg)
    assert results["images"] == 4 and results["psnr"] > 0 and "rfid" not in results and "lpips" not in results
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["psnr"] == pytest.approx(results["psnr"])
    assert any("weights-inception-2015-12-05-6726825d.pth" in note for note in saved["notes"])
    from_checkpoint = evaluate.run(compose_cfg([
        "task=evaluate", f"evaluate.model={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
        f"paths.output_dir={tmp_path / 'eval2'}"]))
    assert from_checkpoint["psnr"] == pytest.approx(results["psnr"], rel=1e-4)  # the export is the EMA weights


def test_ssim_matches_its_formula_on_flat_images():
    """Flat images have no variance, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1), C1 = (0.01 x 2)^2."""
    results = evaluate_reconstructions(lambda x: torch.full_like(x, -0.5),
                                       [{"pixel_values": torch.full((2, 3, 32, 32), 0.5)}], torch.device("cpu"))
    c1 = (0.01 * 2.0) ** 2
    assert results["ssim"] == pytest.approx((2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1), rel=1e-4)
    assert results["psnr"] == pytest.approx(10 * math.log10(4 / 1.0), rel=1e-6) and results["psnr_std"] == 0
