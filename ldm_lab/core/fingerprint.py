"""The one key of every cache of a frozen network's outputs (the latent cache's first stage, the text cache's
encoder, any feature network later): a hash of what the network is (a JSON description: its class, config and
how its output is made, dtype and lengths included) and of its weights. A cache keys its entries within by their
input (an image's pixels, a caption's text), so another network, another setting or another input is computed
again, never read stale."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def fingerprint(description: dict, network: nn.Module) -> str:
    """SHA-256 of ``description`` (as sorted JSON) and of ``network``'s state dict, name by name."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_key(text: str) -> str:
    """The key of one text's entry: the SHA-1 of its UTF-8 bytes."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
