"""What the tasks work out from a model's config before anything is built: the image side multiple it needs (the
data, task=buckets), what it takes from its data (a class-conditional model's classes, a scratch text encoder's
tokenizer, task=train), and the config the memory plan builds (task=plan). A latent diffusion model's config
names a ``denoiser``, an autoencoder's a ``vae``."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra.utils import get_method
from omegaconf import DictConfig, open_dict

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.nn.denoisers import side_multiple
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.nn.text_encoders import (
    pretrained,
    save_tokenizer,
    scratch,
    stand_in,
    tokenizer_of_files,
    train_tokenizer,
)

log = logging.getLogger(__name__)


def is_latent_diffusion(model: DictConfig) -> bool:
    return "denoiser" in model


def downsample_factor(model: DictConfig, first_stage: FrozenAutoencoder | None = None) -> int:
    """Pixels per side of the smallest feature map: an autoencoder's downsampling; a latent diffusion model's
    denoiser side multiple times its first stage's downsampling (``first_stage`` when loaded already; without
    ``model.first_stage``, 1: image sides then fit any first stage up to the denoiser's step)."""
    if not is_latent_diffusion(model):
        return downsampling(model.vae)
    if first_stage is None and model.first_stage:
        first_stage = load_first_stage(model.first_stage)
    return (first_stage.downsample_factor if first_stage else 1) * side_multiple(model.denoiser)


def with_data(model: DictConfig, datamodule, tokenizer_dir: Path | None = None, ckpt_path: str | None = None
              ) -> DictConfig:
    """The config completed with what comes from its data, before the stage is built: a class-conditional model's
    ``class_names`` are its data's (indexed here), so the checkpoint's config rebuilds it; given ones must be the
    data's. A text-conditional model with the scratch text encoder gets its tokenizer (:func:`with_tokenizer`)."""
    if model.get("conditioning") == "text":
        return with_tokenizer(model, datamodule, tokenizer_dir, ckpt_path)
    if model.get("conditioning") != "class":
        return model
    datamodule.prepare_data()
    datamodule.setup_index()
    names = datamodule.class_names
    if names is None:
        raise ConfigError(f"model.conditioning=class learns the classes of its data, and {datamodule.source.name} "
                          f"has none: label it (data=folder data.source.labels=subfolder, a Hugging Face "
                          f"data.source.label_column, or the synthetic data.source.num_classes=4), or set "
                          f"model.conditioning=null")
    if model.get("class_names") is not None and list(model.class_names) != names:
        raise ConfigError(f"model.class_names={list(model.class_names)} are not the data's classes {names}: leave "
                          f"model.class_names unset (it is filled from the data)")
    with open_dict(model):
        model.class_names = names
    return model


def for_planning(model: DictConfig, random_first_stage: Callable[[], dict]) -> DictConfig:
    """The config made buildable offline without changing its memory. An autoencoder: LPIPS with a random backbone
    (the same network), no validation metrics, the adversarial terms on from the start (the step's worst case). A
    latent diffusion model: an unscaled learning rate (its value takes no memory; scaling it needs a datamodule), a
    latent scale of 1, without a first stage a random one (``random_first_stage()``: its description), a
    class-conditional model's classes, which come from the data, as 1000 stand-ins (a few MB of embedding), a
    pretrained text encoder as a random one of its architecture (:func:`~ldm_lab.nn.text_encoders.stand_in`) and
    a scratch encoder's tokenizer, learned from the data, as a small stand-in (its embedding table is smaller), and
    REPA's image encoder as a random one of its architecture."""
    with open_dict(model):
        if not is_latent_diffusion(model):
            model.loss.update(lpips_backbone="random", require_perceptual_weights=False, disc_start=0)
            model.metrics.update(lpips=False, rfid=False)
            return model
        model.scale_lr = False
        model.latent_scale = model.latent_scale or 1.0
        if model.first_stage is None:
            model.first_stage = random_first_stage()
        if model.get("representation", {}).get("loss") == "repa":
            model.representation.encoder_weights = "random"
        if model.get("conditioning") == "class" and not model.get("class_names"):
            model.class_names = [str(i) for i in range(1000)]
        encoder = model.get("text_encoder")
        if encoder is not None and get_method(encoder._target_) is pretrained:
            model.text_encoder = {"_target_": f"{stand_in.__module__}.{stand_in.__name__}", "_partial_": True,
                                  **{key: encoder[key] for key in ("pretrained_model_name_or_path", "max_length",
                                                                   "dtype", "trainable")}}
        elif encoder is not None and not encoder.get("tokenizer"):
            tokenizer = train_tokenizer(["a stand-in caption"], vocab_size=300, max_length=encoder.max_length)
            encoder.tokenizer = str(save_tokenizer(tokenizer, Path(tempfile.mkdtemp(prefix="ldm_lab-plan-"))))
    return model


def with_tokenizer(model: DictConfig, datamodule, tokenizer_dir: Path | None, ckpt_path: str | None) -> DictConfig:
    """``model.text_encoder.tokenizer`` of the scratch text encoder, made once and kept: the one
    ``tokenizer_dir`` already holds (a requeued or resumed run's folder), else the resumed checkpoint's
    (``ckpt_path``), else one trained on the captions of the training images
    (:func:`~ldm_lab.nn.text_encoders.train_tokenizer`), saved in ``tokenizer_dir``. Data without captions is
    refused."""
    datamodule.prepare_data()
    datamodule.setup_index()
    if not datamodule.captioned:
        raise ConfigError(f"model.conditioning=text learns from captions, and {datamodule.source.name} has none: "
                          f"data.source.caption_extension=.txt (a caption file beside each image), "
                          f"data.source.caption_column=<column> (metadata.jsonl or a Hugging Face column), or the "
                          f"synthetic data.source.captions=true")
    encoder = model.text_encoder
    if encoder is None or get_method(encoder._target_) is not scratch or encoder.get("tokenizer"):
        return model
    if tokenizer_dir is None:
        raise ConfigError("model.text_encoder=scratch trains its tokenizer on the captions where task=train runs: "
                          "give model.text_encoder.tokenizer=<a tokenizer folder> here")
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        if ckpt_path is not None:
            checkpoint = read_checkpoint(ckpt_path, mmap=True)
            files = checkpoint["ldm_lab"].get("text_encoder", {}).get("tokenizer")
            if files is None:
                raise ConfigError(f"ckpt_path={ckpt_path} holds no text encoder's tokenizer: it is no text-conditional "
                                  f"model; start a new run without ckpt_path")
            tokenizer = tokenizer_of_files(files)
            log.info("tokenizer: the resumed checkpoint's (%d tokens)", len(tokenizer))
        else:
            captions = [caption for i in np.flatnonzero(~datamodule.is_val) for caption in datamodule.index.captions[i]]
            tokenizer = train_tokenizer(captions, encoder.vocab_size, encoder.max_length)
            log.info("tokenizer: %d tokens learned from %d captions", len(tokenizer), len(captions))
        save_tokenizer(tokenizer, tokenizer_dir)
    with open_dict(model):
        model.text_encoder.tokenizer = str(tokenizer_dir)
    return model
