"""Typed schemas for the config groups whose values have a fixed set of choices.

Registered in Hydra's ConfigStore under ``schema/`` and pulled into the YAML files through their
defaults lists, so a typo such as ``disc.norm_type=spectral_grp`` fails at compose time with the
list of valid values, before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hydra.core.config_store import ConfigStore


class NormType(str, Enum):
    """PatchGAN normalisation (seed 001): spectral norm on every conv, plus GroupNorm or BatchNorm."""

    spectral_group = "spectral_group"
    spectral = "spectral"
    batch = "batch"
    none = "none"


class RecLoss(str, Enum):
    l1 = "l1"
    l2 = "l2"


class DiscLoss(str, Enum):
    hinge = "hinge"
    vanilla = "vanilla"


@dataclass
class PatchGANConfig:
    _target_: str = "ldm_lab.nn.discriminator.NLayerDiscriminator"
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm_type: NormType = NormType.spectral_group
    num_groups: int = 32


@dataclass
class AutoencoderLossConfig:
    _target_: str = "ldm_lab.losses.autoencoder.AutoencoderLoss"
    rec_loss: RecLoss = RecLoss.l1
    perceptual_weight: float = 0.5
    require_perceptual_weights: bool = True
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_factor: float = 1.0
    disc_loss: DiscLoss = DiscLoss.hinge
    max_adaptive_weight: float = 10.0
    lpips_backbone: str = "pretrained"
    vgg16_weights: str | None = None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; call before composing (run.py and the tests do)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="patchgan", node=PatchGANConfig)
    cs.store(group="schema", name="autoencoder_loss", node=AutoencoderLossConfig)
