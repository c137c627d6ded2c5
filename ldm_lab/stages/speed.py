"""Speed options (``conf/speed``), applied to a built stage. Each is measured by ``make bench``."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn


def use_sdpa(network: nn.Module, enabled: bool = True) -> None:
    """Route every diffusers attention layer through ``F.scaled_dot_product_attention`` (flash or
    memory-efficient kernels where the device has them) or, disabled, the classic matmul-softmax."""
    for module in network.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0() if enabled else AttnProcessor())


def optimizer_options(make_optimizer, fused: bool) -> dict:
    """``{"fused": True}`` when asked for, on CUDA, for an optimizer class that has a fused kernel."""
    optimizer_class = getattr(make_optimizer, "func", make_optimizer)
    if fused and torch.cuda.is_available() and "fused" in inspect.signature(optimizer_class).parameters:
        return {"fused": True}
    return {}


def apply_speed_options(stage: nn.Module, channels_last: bool | str = "auto", sdpa: bool = True,
                        fused_adamw: bool = True, compile: bool = False, cudnn_benchmark: bool = True) -> None:
    """Set the options on ``stage`` (a TrainingStage); ``channels_last="auto"`` means on CUDA only.
    ``cudnn_benchmark`` is the Trainer's ``benchmark``."""
    if channels_last == "auto":
        channels_last = torch.cuda.is_available()
    use_sdpa(stage, sdpa)
    if channels_last:
        stage.to(memory_format=torch.channels_last)
    stage.channels_last = channels_last
    stage.fused_optimizer = fused_adamw
    if compile:
        stage.trained_network.compile()  # in place: parameter names and checkpoints stay as they are
