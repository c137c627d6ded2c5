"""Speed options (``conf/speed``), applied to a built stage. Each is measured by ``make bench``."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ldm_lab.core.errors import ConfigError

# speed.compile=blocks compiles these, as diffusers' compile_repeated_blocks compiles a model's _repeated_blocks (it
# names them for UNet2DConditionModel alone): the blocks every denoiser and autoencoder repeats
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
COMPILE = (False, True, "network", "blocks")  # speed.compile; true = network


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


def compile_network(network: nn.Module, how: bool | str) -> int:
    """``torch.compile`` ``network`` in place (parameter names and checkpoints stay as they are): whole (``True`` or
    "network"), or each of its repeated blocks ("blocks", regional compilation: instances of one class share the
    compiled code, so compilation costs about one block's, and a shape seen again recompiles once with dynamic
    sides). The number of modules compiled."""
    if how not in COMPILE:
        raise ConfigError(f"speed.compile={how}: false, true (the network whole, = network) or blocks (each repeated "
                          f"block: {', '.join(REPEATED_BLOCKS)})")
    if how == "blocks":
        blocks = [module for module in network.modules() if type(module).__name__ in REPEATED_BLOCKS]
        # the blocks share their code, compiled for each configuration (a UNet's resnets differ in channels and
        # shortcut) and shape: the quickstart UNet's 11 resnets took 27 graphs over three bucket shapes, beyond
        # dynamo's default limit of 8, past which a block runs eager (experiments/bench/results/step.md counts them)
        limit = torch._dynamo.config
        limit.recompile_limit = max(limit.recompile_limit, 8 * len(blocks))
        for block in blocks:
            block.compile()
        return len(blocks)
    if how:
        network.compile()
        return 1
    return 0


def apply_speed_options(stage: nn.Module, channels_last: bool | str = "auto", sdpa: bool = True,
                        fused_adamw: bool = True, compile: bool | str = False, cudnn_benchmark: bool = True) -> None:
    """Set the options on ``stage`` (a TrainingStage); ``channels_last="auto"`` means on CUDA only.
    ``cudnn_benchmark`` is the Trainer's ``benchmark``."""
    if channels_last == "auto":
        channels_last = torch.cuda.is_available()
    use_sdpa(stage, sdpa)
    if channels_last:
        stage.to(memory_format=torch.channels_last)
    stage.channels_last = channels_last
    stage.fused_optimizer = fused_adamw
    compile_network(stage.trained_network, compile)
