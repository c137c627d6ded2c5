"""The denoisers a latent diffusion model trains: how each is built for the latents, classes or text it sees, and
the side multiple it needs. Their call, (latents, timesteps, class labels or prompt embeddings) -> prediction, is
the exported pipeline's (ldm_lab/diffusion/pipeline.py ``predict``). A new backbone is one :class:`Backbone`
subclass here, its call in the pipeline file, and one config.

- ``UNet2DModel`` (LDM's UNet; classes through diffusers' ``num_class_embeds`` = K + 1, added to the time
  embedding as ADM does, id K the null class).
- ``UNet2DConditionModel`` (Stable Diffusion's UNet): cross-attention to a text encoder's embeddings
  (``cross_attention_dim`` = its width).
- ``PixArtTransformer2DModel`` (PixArt-alpha, Chen et al. 2023): DiT blocks with cross-attention to a text
  encoder's embeddings (T5's, padding masked) and adaLN-single; any latent shape.
- ``DiTTransformer2DModel`` (DiT, Peebles & Xie 2023), with what diffusers' class leaves out: adaLN-Zero
  initialisation (DiT's ``initialize_weights``), label dropout done once outside (each block's own is set to 0),
  an unconditional model as one dummy class, and square latents only (its unpatchify is square).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import ClassVar

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.nn.downsampling import downsampling


class Backbone:
    """A diffusers denoiser class: ``model_class``; ``architecture``, the config keys two networks must share for
    weights to move between them; ``conditionings``: the ``model.conditioning`` values it takes (None:
    unconditional); ``square_only``: whether it denoises square latents only."""

    model_class: ClassVar[type[nn.Module]]
    architecture: ClassVar[tuple[str, ...]]
    conditionings: ClassVar[tuple[str | None, ...]] = (None, "class")
    square_only: ClassVar[bool] = False

    def build(self, network: functools.partial, channels: int, num_classes: int | None,
              text_width: int | None) -> nn.Module:
        raise NotImplementedError

    def side_multiple(self, config: Mapping) -> int:
        raise NotImplementedError

    def middle(self, network: nn.Module) -> str:
        """The block at the network's middle, by its submodule name: a UNet's ``mid_block``, a transformer's block
        at half its depth (the dispersive loss's)."""
        if hasattr(network, "transformer_blocks"):
            return f"transformer_blocks.{len(network.transformer_blocks) // 2 - 1}"
        return "mid_block"

    def alignment_blocks(self, network: nn.Module) -> tuple[str, str]:
        """The blocks representation alignment reads, by submodule name: the aligned one (REPA's and SRA's student)
        and SRA's teacher. A transformer's at a third and two thirds of its depth (REPA's SiT-XL/2: block 8 of 28;
        SRA's SiT-B/2: blocks 4 and 8 of 12); a UNet's ``mid_block`` (U-REPA's) and its first up block."""
        if hasattr(network, "transformer_blocks"):
            depth = len(network.transformer_blocks)
            return (f"transformer_blocks.{max(0, depth // 3 - 1)}", f"transformer_blocks.{max(0, 2 * depth // 3 - 1)}")
        return "mid_block", "up_blocks.0"


class UNet(Backbone):
    """diffusers' ``UNet2DModel``: halves the side at each level but the last."""

    model_class = UNet2DModel
    architecture = ("block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim",
                    "in_channels", "num_class_embeds")

    def build(self, network: functools.partial, channels: int, num_classes: int | None,
              text_width: int | None) -> nn.Module:
        classes = {} if num_classes is None else {"num_class_embeds": num_classes + 1}
        return network(in_channels=channels, out_channels=channels, **classes)

    def side_multiple(self, config: Mapping) -> int:
        return downsampling(config)


class UNetText(Backbone):
    """diffusers' ``UNet2DConditionModel`` (Stable Diffusion's): its cross-attention layers read the prompt's
    embeddings, of the text encoder's width (``cross_attention_dim``)."""

    model_class = UNet2DConditionModel
    architecture = ("block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim",
                    "in_channels", "cross_attention_dim")
    conditionings = ("text",)

    def build(self, network: functools.partial, channels: int, num_classes: int | None,
              text_width: int | None) -> nn.Module:
        return network(in_channels=channels, out_channels=channels, cross_attention_dim=text_width)

    def side_multiple(self, config: Mapping) -> int:
        return downsampling(config)


class DiT(Backbone):
    """diffusers' ``DiTTransformer2DModel``: ``num_embeds_ada_norm`` classes K and its own null id K (the row its
    label embedder adds for classifier-free guidance); an unconditional model is K = 1 and always class 0."""

    model_class = DiTTransformer2DModel
    architecture = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels",
                    "num_embeds_ada_norm")
    square_only = True

    def build(self, network: functools.partial, channels: int, num_classes: int | None,
              text_width: int | None) -> nn.Module:
        model = network(in_channels=channels, out_channels=channels, num_embeds_ada_norm=num_classes or 1)
        initialize_adaln_zero(model)
        for block in model.transformer_blocks:  # labels are dropped once, by the stage, not again per block
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return model

    def side_multiple(self, config: Mapping) -> int:
        return config["patch_size"]


class PixArt(Backbone):
    """diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha, Chen et al. 2023): DiT blocks with cross-attention to
    the prompt's embeddings (``caption_channels`` = the encoder's width, projected to the model's width) and
    adaLN-single, initialised as PixArt-alpha's ``initialize_weights``; any latent shape (its position embedding is
    recomputed for the input's size)."""

    model_class = PixArtTransformer2DModel
    architecture = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels",
                    "caption_channels")
    conditionings = ("text",)

    def build(self, network: functools.partial, channels: int, num_classes: int | None,
              text_width: int | None) -> nn.Module:
        width = network.keywords["num_attention_heads"] * network.keywords["attention_head_dim"]
        model = network(in_channels=channels, out_channels=channels, caption_channels=text_width,
                        cross_attention_dim=width)
        initialize_pixart(model)
        return model

    def side_multiple(self, config: Mapping) -> int:
        return config["patch_size"]


def model_classes() -> dict[str, type[nn.Module]]:
    """The denoiser classes the lab trains and loads, by name."""
    return {backbone.model_class.__name__: backbone.model_class for backbone in Backbone.__subclasses__()}


def backbone(network_or_config: nn.Module | Mapping) -> Backbone:
    """The backbone of a network, of its diffusers config (``_class_name``) or of a composed ``model.denoiser``
    config (``_target_``)."""
    if isinstance(network_or_config, nn.Module):
        name = type(network_or_config).__name__
    else:
        name = network_or_config.get("_class_name") or str(network_or_config.get("_target_", "")).rpartition(".")[2]
    for kind in Backbone.__subclasses__():
        if kind.model_class.__name__ == name:
            return kind()
    raise ConfigError(f"model.denoiser: {name or 'a config without _target_'} is no denoiser the lab knows; use "
                      f"one of {', '.join(model_classes())} (model=unet, dit, unet_text, dit_text or a tiny variant)")


def build(network: functools.partial, channels: int, conditioning: str | None = None, num_classes: int | None = None,
          text_width: int | None = None) -> nn.Module:
    """The denoiser ``network`` (a partial of the model class) for latents of ``channels``, conditioned as
    ``conditioning`` says: on ``num_classes`` classes, or on prompts embedded ``text_width`` wide."""
    kind = backbone({"_class_name": network.func.__name__})
    if conditioning not in kind.conditionings:
        text = {True: "model=unet_text or dit_text (or a tiny variant)", False: "model=unet or dit"}[conditioning == "text"]
        raise ConfigError(f"model.conditioning={conditioning}: {network.func.__name__} takes "
                          f"{' or '.join(str(c) for c in kind.conditionings)}; for this conditioning use {text}")
    return kind.build(network, channels, num_classes, text_width)


def feature_block(network: nn.Module, name: str, key: str = "model.representation.block") -> nn.Module:
    """The submodule of ``network`` whose output a representation loss reads: ``name``, a dotted submodule name such
    as ``mid_block`` or ``transformer_blocks.5`` (``key``: the config key that gave it)."""
    try:
        return network.get_submodule(name)
    except AttributeError:
        blocks = [n for n, _ in network.named_children()]
        raise ConfigError(f"{key}={name}: {type(network).__name__} has no such submodule; its "
                          f"blocks: {', '.join(blocks)} (index a list: transformer_blocks.3, down_blocks.1)") from None


def side_multiple(network_or_config: nn.Module | Mapping) -> int:
    """Latents per output position: latent sides must divide by it (UNet: its downsampling; DiT: its patch)."""
    config = network_or_config.config if isinstance(network_or_config, nn.Module) else network_or_config
    return backbone(network_or_config).side_multiple(config)


def initialize_adaln_zero(model: nn.Module) -> None:
    """DiT's ``initialize_weights`` on diffusers' layout: Xavier-uniform linear layers with zero biases, the patch
    projection as a linear layer, N(0, 0.02) class and timestep embeddings, and zero adaLN modulations (each
    block's ``norm1.linear``, the final ``proj_out_1``) and final projection (``proj_out_2``), so every block
    starts as the identity. (DiT's fused qkv projection is three layers here, each Xavier on its own shape.)"""
    _xavier_linear_layers(model)
    nn.init.zeros_(model.pos_embed.proj.bias)
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


def initialize_pixart(model: nn.Module) -> None:
    """PixArt-alpha's ``initialize_weights`` on diffusers' layout: Xavier-uniform linear layers with zero biases, the
    patch projection as a linear layer, N(0, 0.02) timestep MLP, adaLN-single projection and caption projection,
    and zero cross-attention outputs (``attn2.to_out``) and final projection (``proj_out``), so the text first
    enters through trained weights and every block starts near the identity."""
    _xavier_linear_layers(model)
    timestep = model.adaln_single.emb.timestep_embedder
    for layer in (timestep.linear_1, timestep.linear_2, model.adaln_single.linear,
                  model.caption_projection.linear_1, model.caption_projection.linear_2):
        nn.init.normal_(layer.weight, std=0.02)
    for layer in [block.attn2.to_out[0] for block in model.transformer_blocks] + [model.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _xavier_linear_layers(model: nn.Module) -> None:
    """The start DiT and PixArt-alpha share (their ``_basic_init``): Xavier-uniform linear layers with zero biases,
    and the patch projection's weight Xavier-uniform as the linear layer it is."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
