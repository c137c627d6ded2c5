"""Where a trained model comes from: one resolver for every key that names one (``model.first_stage``,
``model.pretrained``, ``model.denoiser_pretrained``, ``sample.model``, ``evaluate.model``). Each takes the same
kinds of source: a lab training checkpoint (.ckpt), an exported diffusers folder, or an original checkpoint
of LDM, taming or Stable Diffusion (converted once and cached, ldm_lab/io/convert.py). A whole latent
diffusion model also serves as its first stage or its denoiser. ``model.pretrained`` takes a Hugging Face hub
id too (``from_pretrained`` downloads it where there is a network)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL
from torch import nn
from transformers import AutoTokenizer

from ldm_lab.core.errors import ConfigError
from ldm_lab.diffusion.objectives import Objective
from ldm_lab.diffusion.pipeline import LatentDiffusionPipeline
from ldm_lab.diffusion.sampling import assemble
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.io.convert import converted, is_original
from ldm_lab.io.networks import autoencoder_of, holds_latent_diffusion, latent_diffusion_of
from ldm_lab.nn.denoisers import model_classes
from ldm_lab.nn.frozen_autoencoder import AUTOENCODERS, FrozenAutoencoder
from ldm_lab.nn.text_encoders import load_text_model

AUTOENCODER, DENOISER, LATENT_DIFFUSION = "autoencoder", "denoiser", "latent_diffusion"
WHAT = {AUTOENCODER: "an autoencoder (model=vae, vqvae or their tiny variants; AutoencoderKL or VQModel)",
        DENOISER: "a denoiser (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel or PixArtTransformer2DModel)",
        LATENT_DIFFUSION: "a latent diffusion model (model=unet, dit, unet_text or dit_text; a pipeline folder)"}
# A pipeline folder's subfolders: LDMPipeline's names, which the lab's own pipeline (diffusion/pipeline.py) keeps
# for every denoiser, or Stable Diffusion's and PixArt-alpha's
PARTS = {AUTOENCODER: ("vqvae", "vae"), DENOISER: ("unet", "transformer")}


class SourceError(ConfigError):
    """A model source the key cannot take; the message names the key, what it holds and what it takes."""


@dataclass(frozen=True)
class Source:
    """A resolved model source: a lab training checkpoint or a diffusers folder (an original checkpoint is
    converted to one), and what it holds."""

    key: str
    path: Path
    holds: str  # AUTOENCODER | DENOISER | LATENT_DIFFUSION
    checkpoint: dict | None = field(default=None, compare=False, repr=False)  # a lab training checkpoint, read
    # with its tensors memory-mapped; None: a diffusers folder

    def folder(self, part: str) -> Path:
        """The diffusers folder of ``part``: the folder itself, or a pipeline's subfolder."""
        if self.holds != LATENT_DIFFUSION or part == LATENT_DIFFUSION:
            return self.path
        return next((self.path / name for name in PARTS[part] if (self.path / name).is_dir()), self.path / PARTS[part][0])


def _error(key: str, value, problem: str, accepts: tuple[str, ...]) -> SourceError:
    return SourceError(
        f"{key}={value} {problem}. {key} takes {' or '.join(WHAT[a] for a in accepts)}, as a training checkpoint "
        f"(<run>/checkpoints/last.ckpt), an exported diffusers folder (<run>/export) or an original checkpoint "
        f"(LDM's or taming's model.ckpt, Stable Diffusion's VAE .safetensors)")


def _classes_of(kind: str) -> list[str]:
    """The diffusers model classes a folder of ``kind`` (AUTOENCODER | DENOISER) may hold."""
    return [c.__name__ for c in AUTOENCODERS] if kind == AUTOENCODER else list(model_classes())


def _folder_holds(path: Path) -> str | None:
    if (path / "model_index.json").is_file():
        return LATENT_DIFFUSION
    if (path / "config.json").is_file():
        name = json.loads((path / "config.json").read_text()).get("_class_name")
        return next((kind for kind in (AUTOENCODER, DENOISER) if name in _classes_of(kind)), None)
    return None


def resolve(value, key: str, accepts: tuple[str, ...]) -> Source:
    """What ``key=value`` holds, checked against what the key ``accepts`` (a latent diffusion model serves
    as its parts): the one place a source is told apart and refused. A resolved :class:`Source` passes through
    (the loaders below take one, so a checkpoint is read once)."""
    if isinstance(value, Source):
        return value
    path = Path(str(value)).expanduser()
    checkpoint = None
    if path.is_file() and not is_original(path):
        checkpoint = read_checkpoint(path, mmap=True)
        held = LATENT_DIFFUSION if holds_latent_diffusion(checkpoint) else AUTOENCODER
    elif path.is_file():
        path = converted(path)
        held = _folder_holds(path)
    elif path.is_dir():
        held = _folder_holds(path)
        if held is None:
            raise _error(key, value, "is a folder without a diffusers config.json or model_index.json", accepts)
    else:
        raise _error(key, value, "does not exist", accepts)
    if held not in accepts and not (held == LATENT_DIFFUSION and set(accepts) & set(PARTS)):
        raise _error(key, value, f"holds {WHAT[held]}", accepts)
    return Source(key, path, held, checkpoint)


def load_autoencoder(value, key: str, subfolder: str | None = None, model_class: type | None = None) -> nn.Module:
    """The diffusers autoencoder of a source (a training checkpoint's evaluation weights: the EMA when on).
    ``subfolder``: of a folder or hub repository (``model.pretrained_subfolder``, e.g. "vae"); ``model_class``:
    the class the config builds (AutoencoderKL or VQModel), which the source must hold."""
    if not isinstance(value, Source):
        local = Path(str(value)).expanduser()
        if not local.exists() and _is_hub_id(value):
            return _from_hub(model_class or AutoencoderKL, value, key, subfolder)
        value = local / subfolder if subfolder else value
    source = resolve(value, key, (AUTOENCODER,))
    if source.checkpoint is not None:
        vae = autoencoder_of(source.checkpoint)
    else:
        vae = _from_folder(source.folder(AUTOENCODER), _classes_of(AUTOENCODER), AUTOENCODER)
    if model_class is not None and not isinstance(vae, model_class):
        raise SourceError(f"{key}={source.path} holds a {type(vae).__name__}, but the model config builds a "
                          f"{model_class.__name__}: choose the model option of that kind (model=vae for an "
                          f"AutoencoderKL, model=vqvae for a VQModel)")
    return vae


def load_first_stage(value, key: str = "model.first_stage") -> FrozenAutoencoder:
    """A latent diffusion model's frozen first stage from any autoencoder source."""
    return FrozenAutoencoder(load_autoencoder(value, key))


def load_denoiser(value, key: str) -> nn.Module:
    """The denoiser of a source: a UNet2DModel or DiTTransformer2DModel folder, or a latent diffusion model's
    (evaluation weights: the EMA when on)."""
    source = resolve(value, key, (DENOISER,))
    if source.checkpoint is not None:
        return latent_diffusion_of(source.checkpoint).denoiser
    return _from_folder(source.folder(DENOISER), _classes_of(DENOISER), DENOISER)


def _from_folder(folder: Path, known, what: str, config_name: str = "config.json"):
    """A diffusers model or scheduler saved in ``folder``, by the class its config names (one of ``known``)."""
    name = json.loads((folder / config_name).read_text())["_class_name"]
    if name not in known:
        raise SourceError(f"{folder} holds a {name}, which is no {what} the lab loads ({', '.join(known)})")
    return getattr(diffusers, name).from_pretrained(folder)


def load_latent_diffusion(value, key: str) -> LatentDiffusionPipeline:
    """A whole latent diffusion model as the pipeline that samples it: a training checkpoint's evaluation denoiser
    and sampling scheduler, or a pipeline folder's (``vqvae.config.scaling_factor`` is its latent scale; the lab's
    own ``model_index.json`` names its classes and objective, an ``LDMPipeline``'s is told by its scheduler)."""
    source = resolve(value, key, (LATENT_DIFFUSION,))
    if source.checkpoint is not None:
        networks = latent_diffusion_of(source.checkpoint)
        return assemble(networks.vae, networks.denoiser, networks.latent_scale, networks.objective,
                        networks.class_names, networks.tokenizer, networks.text_encoder)
    vae = load_autoencoder(source.folder(AUTOENCODER), key)
    index = json.loads((source.path / "model_index.json").read_text())
    denoiser = _from_folder(source.folder(DENOISER), _classes_of(DENOISER), DENOISER).eval()
    scheduler = _from_folder(source.path / "scheduler", Objective.scheduler_names(), "scheduler",
                             "scheduler_config.json")
    objective = Objective.named(index.get("objective"), scheduler)
    tokenizer, text_encoder = None, None
    if (source.path / "text_encoder").is_dir():  # a text-conditional model's, as transformers saved them
        tokenizer = AutoTokenizer.from_pretrained(source.path / "tokenizer")
        text_encoder = load_text_model(source.path / "text_encoder").eval()
    return LatentDiffusionPipeline(vae.eval(), denoiser, scheduler, index.get("class_names"), objective.name,
                                   tokenizer, text_encoder)


def _is_hub_id(value) -> bool:
    """``owner/name``: what Hugging Face's hub names a repository by."""
    parts = str(value).split("/")
    return len(parts) == 2 and all(parts) and not str(value).startswith((".", "~"))


def _from_hub(model_class: type, value, key: str, subfolder: str | None) -> nn.Module:
    try:
        return model_class.from_pretrained(value, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise SourceError(
            f"{key}={value} (subfolder {subfolder!r}) could not be loaded from the Hugging Face hub: {error}\n"
            f"Without network access, download it where you have one (`hf download {value} --local-dir "
            f"./{str(value).split('/')[-1]}`), copy the folder here and pass {key}=/path/to/that/folder") from error
