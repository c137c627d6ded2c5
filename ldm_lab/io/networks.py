"""The networks a lab training checkpoint holds, as the diffusers models they are: built without allocating their
parameters (accelerate's ``init_empty_weights``), then given the checkpoint's tensors, memory-mapped and read once.
Nothing that only training uses is built (no discriminator, LPIPS, optimizer or random initialisation), and no
stage: the checkpoint's config names each network's class and arguments, its state dict holds them under the
training stage's attribute names (``vae``, ``denoiser``, ``first_stage.vae``, ``text_encoder``, and ``ema.module``
and ``text_ema.module`` for the EMAs); a text-conditional model's checkpoint also describes its text encoder and
stores its tokenizer's files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from hydra.utils import instantiate
from torch import nn

from ldm_lab.diffusion.objectives import Objective
from ldm_lab.nn import denoisers
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.nn.text_encoders import embedding_width, tokenizer_of_files

EMA = "ema.module."  # the EMA's weights: what validation's *_ema, sampling and the export use when a run kept one
TEXT_EMA = "text_ema.module."  # a trained text encoder's


def holds_latent_diffusion(checkpoint: dict) -> bool:
    """A latent diffusion checkpoint describes its first stage; an autoencoder's does not."""
    return "first_stage" in checkpoint["ldm_lab"]


def _weights(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _evaluation_weights(state_dict: dict, network: str) -> dict[str, torch.Tensor]:
    """The EMA's weights when the run kept one, else ``network``'s."""
    return _weights(state_dict, EMA) or _weights(state_dict, f"{network}.")


def _with_weights(build: Callable[[], nn.Module], weights: dict[str, torch.Tensor]) -> nn.Module:
    """``build()`` with its parameters on the meta device (buffers real), then ``weights`` assigned in place."""
    with init_empty_weights():
        network = build()
    network.load_state_dict(weights, strict=True, assign=True)
    return network.eval()


def autoencoder_of(checkpoint: dict) -> nn.Module:
    """An autoencoder checkpoint's evaluation autoencoder, or a latent diffusion checkpoint's first stage."""
    state_dict = checkpoint["state_dict"]
    if holds_latent_diffusion(checkpoint):
        description = checkpoint["ldm_lab"]["first_stage"]
        model_class = getattr(diffusers, description["class_name"])
        return _with_weights(lambda: model_class.from_config(description["config"]),
                             _weights(state_dict, "first_stage.vae."))
    vae = instantiate(checkpoint["ldm_lab"]["config"]["model"]["vae"])
    return _with_weights(vae, _evaluation_weights(state_dict, "vae"))


@dataclass
class LatentDiffusionNetworks:
    """What a latent diffusion checkpoint holds for sampling: its first stage, its evaluation denoiser, the latent
    scale, the objective, a class-conditional model's class names, a text-conditional model's tokenizer and
    (evaluation) text encoder."""

    vae: nn.Module
    denoiser: nn.Module
    latent_scale: float
    objective: Objective
    class_names: list[str] | None
    tokenizer: object = None
    text_encoder: nn.Module | None = None


def _text_encoder_of(checkpoint: dict) -> tuple[object, nn.Module | None]:
    """A text-conditional checkpoint's tokenizer and evaluation text encoder (the EMA of a trained one), or Nones."""
    description = checkpoint["ldm_lab"].get("text_encoder")
    if description is None:
        return None, None
    model_class = getattr(transformers, description["class_name"])
    config = model_class.config_class.from_dict(description["config"])
    weights = _weights(checkpoint["state_dict"], TEXT_EMA) or _weights(checkpoint["state_dict"], "text_encoder.")
    return tokenizer_of_files(description["tokenizer"]), _with_weights(lambda: model_class(config), weights)


def latent_diffusion_of(checkpoint: dict) -> LatentDiffusionNetworks:
    model = checkpoint["ldm_lab"]["config"]["model"]
    state_dict = checkpoint["state_dict"]
    vae = autoencoder_of(checkpoint)
    conditioning = model.get("conditioning")
    class_names = model.get("class_names") if conditioning == "class" else None
    tokenizer, text_encoder = _text_encoder_of(checkpoint)
    channels = FrozenAutoencoder(vae).latent_channels
    network = instantiate(model["denoiser"])
    text_width = None if text_encoder is None else embedding_width(text_encoder)
    denoiser = _with_weights(
        lambda: denoisers.build(network, channels, conditioning, len(class_names) if class_names else None, text_width),
        _evaluation_weights(state_dict, "denoiser"))
    return LatentDiffusionNetworks(vae, denoiser, float(state_dict["latent_scale"]), instantiate(model["objective"]),
                                   class_names, tokenizer, text_encoder)
