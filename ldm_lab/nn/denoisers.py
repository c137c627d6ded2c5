"""The denoisers a latent diffusion model trains, behind one call: (latents, timesteps (N,), class labels or None)
-> prediction, and the side multiple each needs. The stage, the objectives, sampling, guidance and the export
reach a network only through :func:`predict`, :func:`side_multiple` and :func:`build`; a new backbone is one
class here plus one config.

- ``UNet2DModel`` (LDM's UNet; classes through diffusers' ``num_class_embeds`` = K + 1, added to the time
  embedding as ADM does, id K the null class).
- ``DiTTransformer2DModel`` (DiT, Peebles & Xie 2023), with what diffusers' class leaves out: adaLN-Zero
  initialisation (DiT's ``initialize_weights``), label dropout done once outside (each block's own is set to 0),
  an unconditional model as one dummy class, and square latents only (its unpatchify is square).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from ldm_lab.config.errors import ConfigError
from ldm_lab.nn.downsampling import downsampling


class UNet:
    """diffusers' ``UNet2DModel``: halves the side at each level but the last."""

    architecture = ("block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim",
                    "in_channels", "num_class_embeds")
    square_only = False

    def build(self, network: functools.partial, channels: int, num_classes: int | None) -> nn.Module:
        classes = {} if num_classes is None else {"num_class_embeds": num_classes + 1}
        return network(in_channels=channels, out_channels=channels, **classes)

    def side_multiple(self, config: Mapping) -> int:
        return downsampling(config)

    def __call__(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 class_labels: torch.Tensor | None) -> torch.Tensor:
        return network(latents, timesteps, class_labels=class_labels).sample


class DiT:
    """diffusers' ``DiTTransformer2DModel``: ``num_embeds_ada_norm`` classes K and its own null id K (the row its
    label embedder adds for classifier-free guidance); an unconditional model is K = 1 and always class 0."""

    architecture = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels",
                    "num_embeds_ada_norm")
    square_only = True

    def build(self, network: functools.partial, channels: int, num_classes: int | None) -> nn.Module:
        model = network(in_channels=channels, out_channels=channels, num_embeds_ada_norm=num_classes or 1)
        initialize_adaln_zero(model)
        for block in model.transformer_blocks:  # labels are dropped once, by the stage, not again per block
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return model

    def side_multiple(self, config: Mapping) -> int:
        return config["patch_size"]

    def __call__(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 class_labels: torch.Tensor | None) -> torch.Tensor:
        if latents.shape[-2] != latents.shape[-1]:
            raise ConfigError(f"model=dit denoises square latents only (diffusers' DiTTransformer2DModel unpatchifies "
                              f"a square), not {latents.shape[-2]}x{latents.shape[-1]}: train without aspect-ratio "
                              f"buckets (data.buckets=null) and sample with sample.height equal to sample.width")
        if class_labels is None:
            class_labels = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
        return network(latents, timestep=timesteps, class_labels=class_labels).sample


BACKBONES = {"UNet2DModel": UNet(), "DiTTransformer2DModel": DiT()}


def backbone(network_or_config: nn.Module | Mapping) -> UNet | DiT:
    """The backbone of a network, of its diffusers config (``_class_name``) or of a composed ``model.denoiser``
    config (``_target_``)."""
    if isinstance(network_or_config, nn.Module):
        return _named(type(network_or_config).__name__)
    return _named(network_or_config.get("_class_name") or str(network_or_config.get("_target_", "")).rpartition(".")[2])


def _named(name: str) -> UNet | DiT:
    if name not in BACKBONES:
        raise ConfigError(f"model.denoiser: {name or 'a config without _target_'} is no denoiser the lab knows; use "
                          f"one of {', '.join(BACKBONES)} (model=unet, unet_tiny, dit or dit_tiny)")
    return BACKBONES[name]


def build(network: functools.partial, channels: int, num_classes: int | None) -> nn.Module:
    """The denoiser ``network`` (a partial of the model class) for latents of ``channels`` and ``num_classes``
    classes (None: unconditional)."""
    return _named(network.func.__name__).build(network, channels, num_classes)


def predict(network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The network's prediction for ``latents`` at ``timesteps`` (a number or one per image) of ``class_labels``."""
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    return backbone(network)(network, latents, timesteps.expand(len(latents)), class_labels)


def side_multiple(network_or_config: nn.Module | Mapping) -> int:
    """Latents per output position: latent sides must divide by it (UNet: its downsampling; DiT: its patch)."""
    config = network_or_config.config if isinstance(network_or_config, nn.Module) else network_or_config
    return backbone(network_or_config).side_multiple(config)


def initialize_adaln_zero(model: nn.Module) -> None:
    """DiT's ``initialize_weights`` on diffusers' layout: Xavier-uniform linear layers with zero biases, the patch
    projection as a linear layer, N(0, 0.02) class and timestep embeddings, and zero adaLN modulations (each
    block's ``norm1.linear``, the final ``proj_out_1``) and final projection (``proj_out_2``), so every block
    starts as the identity. (DiT's fused qkv projection is three layers here, each Xavier on its own shape.)"""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    for block in model.transformer_blocks:
        embedding = block.norm1.emb
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
