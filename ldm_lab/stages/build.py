"""A stage from its config (through ``_target_``). A trained model is loaded for sampling, evaluation and export
as the networks its checkpoint holds (ldm_lab/io/networks.py), without a stage."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_lab.stages.base import TrainingStage
from ldm_lab.stages.speed import apply_speed_options


def build_stage(model_cfg: DictConfig, disc_cfg: DictConfig | None, speed_cfg: DictConfig | None = None) -> TrainingStage:
    """The stage ``model`` names, with the ``speed`` options applied when given; an adversarial stage gets
    the ``disc`` discriminator, the others ignore it."""
    config = {"model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)}
    if get_class(model_cfg._target_).adversarial:
        stage = instantiate(model_cfg, discriminator=instantiate(disc_cfg, _partial_=True))
        config["disc"] = OmegaConf.to_container(disc_cfg, resolve=True, enum_to_str=True)
    else:
        stage = instantiate(model_cfg)
    if speed_cfg is not None:
        apply_speed_options(stage, **speed_cfg)
    stage.run_config = config
    return stage
