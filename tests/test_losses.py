"""The autoencoder objective's parts, on toy cases with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_lab.losses.adversarial import adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm_lab.losses.autoencoder import AutoencoderLoss
from ldm_lab.nn.discriminator import NLayerDiscriminator


def test_adaptive_weight_equals_its_formula():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    a, b = torch.tensor([0.3, 0.1, -0.7]), torch.tensor([2.0, -1.0, 4.0])
    rec = (w * a).sum() ** 2  # d/dw = 2 (w.a) a
    g = (w * b).sum()  # d/dw = b
    expected = (2 * (w * a).sum() * a).norm() / (b.norm() + 1e-4)
    got = adaptive_weight(rec, g, w, max_weight=1e4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not got.requires_grad


def test_adaptive_weight_is_clamped():
    w = torch.ones(3, requires_grad=True)
    rec = 1000.0 * w.sum()
    g = 1e-3 * w.sum()
    assert adaptive_weight(rec, g, w, max_weight=10.0).item() == 10.0


def test_discriminator_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())


class CountingDisc(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def _toy_decoder():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 3, 3, padding=1)
    z = torch.randn(2, 4, 16, 16)
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    return layer, z, inputs


@pytest.mark.parametrize("gen_step,active", [(4, False), (5, True)])
def test_no_adversarial_term_before_disc_start(gen_step, active):
    loss = AutoencoderLoss(perceptual_weight=0, disc_start=5)
    layer, z, inputs = _toy_decoder()
    disc = CountingDisc()
    total, logs = loss.generator_loss(inputs, layer(z), torch.tensor(0.0), disc, layer.weight, gen_step)
    assert ("g_adv" in logs) is active
    assert (disc.calls > 0) is active
    expected = torch.nn.functional.l1_loss(layer(z), inputs)
    if not active:
        assert total.item() == pytest.approx(expected.item())


def test_lpips_term_sends_gradient_into_the_decoder():
    layer, z, inputs = _toy_decoder()
    loss = AutoencoderLoss(perceptual_weight=1.0, lpips_backbone="random", disc_start=10**9)
    grads = []
    for weight in (1.0, 0.0):
        loss.perceptual_weight = weight
        layer.zero_grad()
        total, _ = loss.generator_loss(inputs, layer(z), torch.tensor(0.0), CountingDisc(), layer.weight, 0)
        total.backward()
        grads.append(layer.weight.grad.clone())
    lpips_grad = grads[0] - grads[1]
    assert lpips_grad.abs().max() > 1e-6
    # ... and exactly the gradient of the LPIPS distance itself
    layer.zero_grad()
    loss.perceptual(layer(z), inputs).mean().backward()
    torch.testing.assert_close(lpips_grad, layer.weight.grad, rtol=1e-4, atol=1e-7)


def test_discriminator_step_leaves_the_vae_gradients_untouched():
    layer, z, inputs = _toy_decoder()
    disc = NLayerDiscriminator(ndf=8, n_layers=2, norm_type="spectral_group", num_groups=4)
    loss = AutoencoderLoss(perceptual_weight=0, disc_start=0)
    d_loss, _ = loss.discriminator_loss(disc, inputs, layer(z))
    d_loss.backward()
    assert layer.weight.grad is None
    assert all(p.grad is not None for p in disc.parameters())


def test_regularisation_term_is_added_as_given():
    layer, z, inputs = _toy_decoder()
    loss = AutoencoderLoss(perceptual_weight=0, disc_start=10**9, rec_loss="l2")
    total, _ = loss.generator_loss(inputs, layer(z), torch.tensor(1.5), CountingDisc(), layer.weight, 0)
    rec = torch.nn.functional.mse_loss(layer(z), inputs)
    assert total.item() == pytest.approx(rec.item() + 1.5, rel=1e-6)
