"""A stage from its config (through ``_target_``), or from a training checkpoint: checkpoint reading
lives here, beside the writing (stages/base.py, ``on_save_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_lab.config.speed import apply_speed_options
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.stages.base import TrainingStage


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


def load_stage(ckpt_path: str | Path) -> TrainingStage:
    """The stage a training checkpoint holds, rebuilt from the config stored in it for inference (export,
    evaluation, sampling; :meth:`TrainingStage.inference_config`). What kind of model a key takes is
    checked by ldm_lab/io/sources.py."""
    checkpoint = read_checkpoint(ckpt_path)
    state = checkpoint["ldm_lab"]
    saved = state["config"]
    model = get_class(saved["model"]["_target_"]).inference_config(saved["model"], state)
    stage = build_stage(OmegaConf.create(model), OmegaConf.create(saved.get("disc")))
    stage.load_state_dict(checkpoint["state_dict"])
    stage.run_config = saved
    return stage.eval()
