"""Offline weights: found where torch keeps them or at an explicit path, else a message that helps."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import vgg16

from ldm_lab.core.weights import MissingWeightsError, find_weights, require_weights
from ldm_lab.evaluation.metrics import ReconstructionMetrics
from ldm_lab.losses.autoencoder import AutoencoderLoss
from ldm_lab.losses.perceptual import LPIPS


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_message_says_what_where_and_how(empty_torch_home):
    with pytest.raises(MissingWeightsError) as info:
        require_weights("vgg16")
    message = str(info.value)
    for part in ("vgg16-397923af.pth", str(empty_torch_home), "make weights",
                 "https://download.pytorch.org/models/vgg16-397923af.pth", "paths.weights.vgg16=/path/to"):
        assert part in message
    assert "do without" not in message  # how to do without it is the caller's: it knows the task


def test_each_task_names_only_its_own_way_to_do_without_weights(empty_torch_home):
    """Training names the loss and validation keys, task=evaluate its own keys, an LDM's sample FID none."""
    with pytest.raises(MissingWeightsError, match="model.loss.perceptual_weight=0 model.metrics.lpips=false"):
        AutoencoderLoss(perceptual_weight=0.5)
    training = ReconstructionMetrics(lpips=True, rfid=True)
    assert "model.metrics.lpips=false" in training.notes[0] and "model.metrics.rfid=false" in training.notes[1]
    evaluation = ReconstructionMetrics(lpips=True, rfid=True, switches="evaluate")
    assert "evaluate.lpips=false" in evaluation.notes[0] and "evaluate.rfid=false" in evaluation.notes[1]
    assert not any("model." in note for note in evaluation.notes)


def test_weights_are_found_in_torch_home_or_at_an_explicit_path(empty_torch_home, tmp_path):
    assert find_weights("inception") is None
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert find_weights("inception") == empty_torch_home / "weights-inception-2015-12-05-6726825d.pth"
    explicit = tmp_path / "elsewhere.pth"
    assert find_weights("vgg16", explicit) is None
    explicit.write_bytes(b"x")
    assert find_weights("vgg16", explicit) == explicit


def test_lpips_loads_its_vgg16_backbone_from_the_file(empty_torch_home):
    empty_torch_home.mkdir(parents=True)
    torch.manual_seed(1)
    reference = vgg16()
    torch.save(reference.state_dict(), empty_torch_home / "vgg16-397923af.pth")
    lpips = LPIPS("pretrained")
    conv = lpips.model.net.slice3._modules["10"]  # features[10], the first conv of block 3
    torch.testing.assert_close(conv.weight, reference.features[10].weight)
    torch.testing.assert_close(lpips.model.net.slice5._modules["28"].bias, reference.features[28].bias)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(lpips(x, x).abs() < 1e-6) and torch.all(lpips(x, -x) > 0)
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_without_weights_fails_with_instructions(empty_torch_home):
    with pytest.raises(MissingWeightsError, match="make weights"):
        LPIPS("pretrained")
