"""What the tasks work out from a model's config before anything is built: the image side multiple it needs (the
data, task=buckets), what it takes from its data (a class-conditional model's classes, task=train), and the config
the memory plan builds (task=plan). A latent diffusion model's config names a ``denoiser``, an autoencoder's a
``vae``."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, open_dict

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.nn.denoisers import side_multiple
from ldm_lab.nn.downsampling import downsampling


def is_latent_diffusion(model: DictConfig) -> bool:
    return "denoiser" in model


def downsample_factor(model: DictConfig) -> int:
    """Pixels per side of the smallest feature map: an autoencoder's downsampling; a latent diffusion model's
    denoiser side multiple times its first stage's downsampling (without ``model.first_stage``, 1: image sides then
    fit any first stage up to the denoiser's step)."""
    if not is_latent_diffusion(model):
        return downsampling(model.vae)
    first_stage = load_first_stage(model.first_stage).downsample_factor if model.first_stage else 1
    return first_stage * side_multiple(model.denoiser)


def with_data(model: DictConfig, datamodule) -> DictConfig:
    """The config completed with what comes from its data, before the stage is built: a class-conditional model's
    ``class_names`` are its data's (indexed here), so the checkpoint's config rebuilds it; given ones must be the
    data's."""
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
    latent scale of 1, without a first stage a random one (``random_first_stage()``: its description), and a
    class-conditional model's classes, which come from the data, as 1000 stand-ins (a few MB of embedding)."""
    with open_dict(model):
        if not is_latent_diffusion(model):
            model.loss.update(lpips_backbone="random", require_perceptual_weights=False, disc_start=0)
            model.metrics.update(lpips=False, rfid=False)
            return model
        model.scale_lr = False
        model.latent_scale = model.latent_scale or 1.0
        if model.first_stage is None:
            model.first_stage = random_first_stage()
        if model.get("conditioning") == "class" and not model.get("class_names"):
            model.class_names = [str(i) for i in range(1000)]
    return model
