"""Token routing for a transformer denoiser's training (TREAD, Krause et al. 2025): at every training step a random
share of the image tokens skips a span of blocks and rejoins, unchanged, after it, so those blocks attend over and
compute fewer tokens; the loss still covers every token, and sampling runs the plain network, which the export
is. Chosen over MaskDiT's masking (Zheng et al. 2023: a decoder, an MAE loss and an unmasking fine-tune) and
micro_diffusion's deferred masking (Sehwag et al. 2024: a patch mixer before the mask, loss on the kept tokens
only): routing adds no module, no loss and no fine-tune, so the trained network is diffusers' own class as it
is. It works by hooks on diffusers' blocks (DiTTransformer2DModel, PixArtTransformer2DModel): no block is renamed,
so checkpoints and EMAs are those of a network trained without it."""

from __future__ import annotations

import torch
from torch import nn

from ldm_lab.core.errors import ConfigError


class TokenRouter:
    """Routes ``ratio`` of the tokens around ``network.transformer_blocks[start:end]`` (``end`` negative: counted
    from the last) between :meth:`start` and :meth:`stop`: the tokens kept are drawn per sample from the step's
    generator, once per step, so a block recomputed under gradient checkpointing sees the same ones."""

    def __init__(self, network: nn.Module, ratio: float, start: int, end: int):
        blocks = getattr(network, "transformer_blocks", None)
        if blocks is None:
            raise ConfigError(f"model.token_routing: {type(network).__name__} has no transformer blocks to route tokens "
                              f"around; use it with model=dit or dit_text (or a tiny variant), or set "
                              f"model.token_routing.ratio=null")
        depth = len(blocks)
        end = end + depth if end < 0 else end
        if not 0 < ratio < 1 or not 0 <= start < end <= depth:
            raise ConfigError(f"model.token_routing: ratio={ratio} must lie in (0, 1) and blocks [start, end) = "
                              f"[{start}, {end}) within the network's {depth}")
        self.ratio, self.span = ratio, (start, end)
        self._routed = {id(module) for block in blocks[start:end] for module in block.modules()}
        self._generator: torch.Generator | None = None
        self._kept: torch.Tensor | None = None
        self._bypass: torch.Tensor | None = None
        blocks[start].register_forward_pre_hook(self._route)
        blocks[end - 1].register_forward_hook(self._rejoin)

    def routes(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block of the span or in one: in training its output holds the kept tokens only."""
        return id(module) in self._routed

    def start(self, generator: torch.Generator) -> None:
        """Route the tokens of this training step's forward (and its recomputation in backward)."""
        self._generator, self._kept = generator, None

    def stop(self) -> None:
        self._generator, self._kept, self._bypass = None, None, None

    def _index(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._kept is None:  # the first block of the span in this step: draw the tokens that go through it
            batch, tokens = hidden_states.shape[:2]
            keep = tokens - round(tokens * self.ratio)
            scores = torch.rand(batch, tokens, generator=self._generator, device=self._generator.device)
            self._kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values.to(hidden_states.device)
        return self._kept[..., None].expand(-1, -1, hidden_states.shape[-1])

    def _route(self, block: nn.Module, args: tuple):
        if self._generator is None:
            return None
        hidden_states = args[0]
        self._bypass = hidden_states
        return (hidden_states.gather(1, self._index(hidden_states)), *args[1:])

    def _rejoin(self, block: nn.Module, args: tuple, output: torch.Tensor):
        if self._generator is None:
            return None
        return self._bypass.scatter(1, self._index(self._bypass), output)
