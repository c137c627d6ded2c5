"""Exponential moving average of a network's weights, as PyTorch's AveragedModel."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


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
