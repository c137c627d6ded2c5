"""Typed schemas for the config groups whose values have a fixed set of choices, and the config's resolver.

Registered in Hydra's ConfigStore under ``schema/`` and pulled into the YAML files through their
defaults lists, so a typo such as ``disc.norm_type=spectral_grp`` fails at compose time with the
list of valid values, before any model is built. The enums live beside the code that uses them; the
values, defaults included, live in the YAML files (``???`` here: each default in one place).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ldm_lab.config.slurm import slurm_run_folder
from ldm_lab.losses.autoencoder import DiscLoss, RecLoss
from ldm_lab.nn.discriminator import NormType


@dataclass
class PatchGANConfig:
    _target_: str = "ldm_lab.nn.discriminator.NLayerDiscriminator"
    in_channels: int = MISSING
    ndf: int = MISSING
    n_layers: int = MISSING
    norm_type: NormType = MISSING
    num_groups: int = MISSING


@dataclass
class AutoencoderLossConfig:
    _target_: str = "ldm_lab.losses.autoencoder.AutoencoderLoss"
    rec_loss: RecLoss = MISSING
    perceptual_weight: float = MISSING
    require_perceptual_weights: bool = MISSING
    disc_weight: float = MISSING
    disc_start: int = MISSING
    disc_factor: float = MISSING
    disc_loss: DiscLoss = MISSING
    max_adaptive_weight: float = MISSING
    lpips_backbone: str = MISSING
    vgg16_weights: str | None = MISSING


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore and the ``run_folder`` resolver in OmegaConf; call before
    composing (run.py and the tests do)."""
    OmegaConf.register_new_resolver("run_folder", slurm_run_folder, replace=True)
    cs = ConfigStore.instance()
    cs.store(group="schema", name="patchgan", node=PatchGANConfig)
    cs.store(group="schema", name="autoencoder_loss", node=AutoencoderLossConfig)
