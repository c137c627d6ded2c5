"""Exponential moving average of a network's weights, as PyTorch's AveragedModel."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_with_warmup(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen EMA copy of ``model``; update it with ``ema.update_parameters(model)`` once per
    optimizer step. The decay at update t is min(decay, (1 + t) / (10 + t)): the warm-up of LDM's
    LitEma (TensorFlow's ExponentialMovingAverage with num_updates), so early averages are not
    dominated by the random initialisation."""

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        t = int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + t) / (10 + t)))

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.requires_grad_(False)
    return ema
