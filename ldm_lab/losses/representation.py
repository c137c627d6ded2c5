"""Losses on a denoiser's intermediate features, added to its objective: the dispersive loss (Wang & He 2025,
"Diffuse and Disperse: Image Generation with Representation Regularization"), which needs no encoder and no
parameters. The features are read by a forward hook on one block (:class:`FeatureTap`)."""

from __future__ import annotations

import math

import torch
from torch import nn


def dispersive_loss(features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The InfoNCE-L2 dispersive loss of the paper's public release: log of the mean, over every pair (i, j) of the
    batch with the diagonal, of exp(-||z_i - z_j||^2 / (d tau)), z_i sample i's flattened features of dimension d.
    Minimising it spreads a batch's representations apart, contrastive learning without positive pairs."""
    z = features.flatten(1).float()
    norms = z.square().sum(dim=1)
    distances = (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0) / z.shape[1]
    return torch.logsumexp(-distances.flatten() / temperature, dim=0) - math.log(distances.numel())


class FeatureTap:
    """Keeps the latest output of ``block`` (a forward hook, registered once, so a compiled network keeps its
    graph): :meth:`take` returns it and lets it go."""

    def __init__(self, block: nn.Module):
        self._output: torch.Tensor | None = None
        block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output) -> None:
        self._output = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        output, self._output = self._output, None
        if output is None:
            raise RuntimeError("the feature block did not run in this forward pass")
        return output
