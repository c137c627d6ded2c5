"""A stage from its config (through ``_target_``), or from a training checkpoint: checkpoint reading
lives here, beside the writing (stages/base.py, ``on_save_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_lab.config.speed import apply_speed_options
from ldm_lab.io.checkpoints import CheckpointError, read_checkpoint
from ldm_lab.stages.autoencoder import AutoencoderStage
from ldm_lab.stages.base import TrainingStage


def build_stage(model_cfg: DictConfig, disc_cfg: DictConfig | None, speed_cfg: DictConfig | None = None) -> TrainingStage:
    """The stage ``model`` names, with the ``speed`` options applied when given; autoencoders get the
    ``disc`` discriminator, the LDM ignores it."""
    adversarial = issubclass(get_class(model_cfg._target_), AutoencoderStage)
    config = {"model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)}
    if adversarial:
        stage = instantiate(model_cfg, discriminator=instantiate(disc_cfg, _partial_=True))
        config["disc"] = OmegaConf.to_container(disc_cfg, resolve=True, enum_to_str=True)
    else:
        stage = instantiate(model_cfg)
    if speed_cfg is not None:
        apply_speed_options(stage, **speed_cfg)
    stage.run_config = config
    return stage


def load_stage(ckpt_path: str | Path, expect: type[TrainingStage] = TrainingStage, key: str = "ckpt_path") -> TrainingStage:
    """The stage a training checkpoint holds, rebuilt from the config stored in it, for inference
    (export, evaluation, sampling): autoencoders without the LPIPS loss and validation metrics, whose
    weights they need not; the LDM with its first stage rebuilt from the checkpoint, not its source.
    A checkpoint of another kind than ``expect`` is refused, naming ``key`` and what the file holds."""
    checkpoint = read_checkpoint(ckpt_path)
    state = checkpoint["ldm_lab"]
    saved = state["config"]
    held = get_class(saved["model"]["_target_"])
    if not issubclass(held, expect):
        raise CheckpointError(f"{key}={ckpt_path} holds {held.description}, but {key} takes {expect.description}")
    if "first_stage" in state:
        saved["model"]["first_stage"] = state["first_stage"]
    else:
        saved["model"]["loss"]["perceptual_weight"] = 0.0
        saved["model"]["metrics"].update(lpips=False, rfid=False)
    stage = build_stage(OmegaConf.create(saved["model"]), OmegaConf.create(saved.get("disc")))
    stage.load_state_dict(checkpoint["state_dict"])
    stage.run_config = saved
    return stage.eval()
