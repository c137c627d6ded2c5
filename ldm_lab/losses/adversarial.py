"""GAN terms of the VQGAN / LDM autoencoder objective (Esser et al. 2021, eq. 7; Rombach et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))], taming's generator term for both discriminator losses."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float,
    eps: float = 1e-4,
) -> torch.Tensor:
    """lambda = ||grad_L rec|| / (||grad_L g|| + eps) at the decoder's last layer L (VQGAN eq. 7),
    clamped to [0, max_weight] and detached: it balances the two terms, it is not trained through."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
