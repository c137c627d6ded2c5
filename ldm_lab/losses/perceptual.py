"""LPIPS (Zhang et al. 2018) with the VGG16 backbone, loaded from a local file.

The ``lpips`` package ships its learned linear heads but fetches the VGG16 backbone through
torchvision at run time; here the backbone is built empty and filled from
``vgg16-397923af.pth`` found by :mod:`ldm_lab.core.weights`, so nothing is downloaded.
"""

from __future__ import annotations

import warnings

import lpips
import torch
from torch import nn
from torchvision.models import vgg16

from ldm_lab.core.weights import require_weights


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance per image, shape (N,), for images in [-1, 1].

    ``backbone="pretrained"`` loads the VGG16 weights (``weights_path`` or the torch hub cache) and
    raises :class:`~ldm_lab.core.weights.MissingWeightsError` with instructions when they are absent;
    ``backbone="random"`` keeps a randomly initialised VGG16, which tests use to exercise the code path.
    """

    def __init__(self, backbone: str = "pretrained", weights_path: str | None = None):
        super().__init__()
        if backbone not in ("pretrained", "random"):
            raise ValueError(f"LPIPS backbone must be 'pretrained' or 'random', not {backbone!r}")
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if backbone == "pretrained":
            state = torch.load(require_weights("vgg16", weights_path), map_location="cpu", weights_only=True)
            features = vgg16().features
            features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                      if k.startswith("features.")})
            # lpips splits VGG16's `features` into slices whose children keep their indices as names.
            for name, module in self.model.net.named_modules():
                if name.count(".") == 1 and name.startswith("slice"):
                    module.load_state_dict(features[int(name.split(".")[1])].state_dict())
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen: no dropout, no statistics

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(input, target).flatten()
