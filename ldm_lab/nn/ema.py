"""Exponential moving averages of a network's weights, as PyTorch's AveragedModel: LDM's fixed decay with warm-up,
and EDM2's power-function EMA with the post-hoc reconstruction of any EMA length from snapshots (Karras et al.
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", section 3 and appendix C)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ldm_lab.core.errors import ConfigError

MAX_SIGMA_REL = (1 / 12) ** 0.5  # gamma -> 0: the widest power-function EMA, a plain running mean


def ema_with_warmup(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen EMA copy of ``model``; update it with ``ema.update_parameters(model)`` once per
    optimizer step. As LDM's LitEma (TensorFlow's ExponentialMovingAverage with num_updates), the
    average starts from the weights at construction and update n (1, 2, ...) uses the decay
    min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the initialisation.
    ``n_averaged`` counts the construction as one: it is n + 1 after n updates."""

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        n = int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + n) / (10 + n)))

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.n_averaged.fill_(1)  # AveragedModel would otherwise copy, not average, at the first update
    ema.requires_grad_(False)
    return ema


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA whose width, the standard deviation of its weights over
    training time relative to the training's length, is ``sigma_rel`` (EDM2 eq. 4, solved as its Algorithm 2):
    the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ConfigError(f"sigma_rel={sigma_rel}: a power-function EMA's relative width lies in (0, "
                          f"{MAX_SIGMA_REL:.4f}) (EDM2 used 0.05 and 0.10 in training, optima 0.025-0.13)")
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots)].real.max())


def power_function_ema(model: nn.Module, sigma_rel: float) -> AveragedModel:
    """A frozen power-function EMA of ``model`` of width ``sigma_rel`` (EDM2 eq. 3): update t (1, 2, ...) averages
    with beta_t = (1 - 1/t)^(gamma + 1), so the first copies the weights and the average always spans a fixed
    share of the training so far. ``n_averaged`` counts the updates."""
    gamma = sigma_rel_to_gamma(sigma_rel)

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        t = int(num_averaged) + 1  # AveragedModel copied at t = 1 and counts the updates before this one
        torch._foreach_lerp_(ema_params, params, 1.0 - (1.0 - 1.0 / t) ** (gamma + 1))

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.requires_grad_(False)
    return ema


def _power_function_inner_product(t_a, gamma_a, t_b, gamma_b):
    """The inner product over training time of the weight responses of the power-function EMAs (t_a, gamma_a) and
    (t_b, gamma_b): EDM2's appendix C.3, whose closed form holds for t_a, t_b > 0."""
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
            / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)))


def posthoc_coefficients(steps: list[int], sigma_rels: list[float], step: int, sigma_rel: float) -> np.ndarray:
    """The weights x_i of the snapshots (``steps[i]``, ``sigma_rels[i]``) whose sum best matches the power-function
    EMA of width ``sigma_rel`` at ``step``: the least-squares fit of its response over training time by theirs
    (EDM2's Algorithm 3), normalised to sum to 1."""
    t = np.asarray(steps, dtype=np.float64)[:, None]
    gammas = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels])[:, None]
    gram = _power_function_inner_product(t, gammas, t.T, gammas.T)
    target = _power_function_inner_product(t[:, 0], gammas[:, 0], np.float64(step), np.float64(sigma_rel_to_gamma(sigma_rel)))
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    return x / x.sum()
