"""The frozen first stage of a latent diffusion model (LDM, Rombach et al. 2022, sec. 3): a trained KL
or VQ autoencoder seen as an encoder to latent *moments*, which the latent cache stores, and a decoder.

- KL (AutoencoderKL): the moments are the posterior's mean and log-variance (diffusers'
  ``latent_dist.parameters``), so every epoch can draw a fresh z ~ q(z|x).
- VQ (VQModel): the moments are the pre-quantization latents; the UNet is trained on them and
  decoding quantizes, as in LDM-VQ-4 (seed 000).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm_lab.io.convert import converted, is_original
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.stages.autoencoder import AutoencoderStage
from ldm_lab.stages.build import load_stage


def kind_of(vae: nn.Module) -> str:
    return "kl" if isinstance(vae, AutoencoderKL) else "vq"


@torch.no_grad()
def encode_moments(vae: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """KL: the posterior's mean and log-variance stacked on channels; VQ: the pre-quantization latents."""
    encoded = vae.encode(pixel_values)
    return encoded.latent_dist.parameters if kind_of(vae) == "kl" else encoded.latents


class LatentScale:
    """1 / std of the latents drawn from moments, from running sums (float64): the latent scale (LDM,
    sec. 4.3.2 and D.1; 0.18215 for SD's VAE). For KL moments the std of a posterior sample, exactly:
    z = mean + std * eps, so E[z^2] = mean^2 + var. One owner for the cache, the stage and the export."""

    def __init__(self, kind: str):
        self.kind = kind
        self.count, self.total, self.squares, self.variance = 0, 0.0, 0.0, 0.0

    def update(self, moments: torch.Tensor) -> None:
        """Moments of one image (C, H, W) or a batch (N, C, H, W)."""
        moments = moments.double()
        if self.kind == "kl":
            mean, logvar = moments.chunk(2, dim=-3)
            self.variance += float(logvar.clamp(-30.0, 20.0).exp().sum())
        else:
            mean = moments
        self.count += mean.numel()
        self.total += float(mean.sum())
        self.squares += float(mean.square().sum())

    @property
    def scaling_factor(self) -> float:
        mean = self.total / self.count
        scale = float(1.0 / np.sqrt((self.squares + self.variance) / self.count - mean**2))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"the latent scale 1/std of {self.count} latent values is {scale}: the latents are "
                             f"constant or not finite. Check the first stage (model.first_stage), or set "
                             f"model.latent_scale=<a number>")
        return scale


def measure_latent_scale(vae: nn.Module, pixel_batches) -> float:
    """:class:`LatentScale` of ``vae``'s moments over batches of ``{"pixel_values"}``."""
    device = next(vae.parameters()).device
    measured = LatentScale(kind_of(vae))
    for batch in pixel_batches:
        measured.update(encode_moments(vae, batch["pixel_values"].to(device)))
    return measured.scaling_factor


class FirstStage(nn.Module):
    """A diffusers autoencoder, frozen and always in eval mode."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)  # frozen: never dropout or batch statistics

    @property
    def kind(self) -> str:
        return kind_of(self.vae)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels if self.kind == "kl" else self.vae.config.vq_embed_dim

    @property
    def downsample_factor(self) -> int:
        return downsampling(self.vae.config)

    def moments(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the cache stores per image (:func:`encode_moments`)."""
        return encode_moments(self.vae, pixel_values)

    def measure_scale(self, pixel_batches) -> float:
        return measure_latent_scale(self.vae, pixel_batches)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Unscaled latents from moments: a posterior sample (KL) or the moments themselves (VQ)."""
        return DiagonalGaussianDistribution(moments).sample(generator) if self.kind == "kl" else moments

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents to pixels in [-1, 1] (a VQModel quantizes them first)."""
        return self.vae.decode(latents).sample

    def fingerprint(self) -> str:
        """A hash of the architecture and the weights: the latent cache's key for this first stage."""
        digest = hashlib.sha256(json.dumps(describe(self.vae), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def describe(vae: nn.Module) -> dict:
    """Class and config: what rebuilds the architecture (weights come from a state dict)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config.pop("scaling_factor", None)  # measured, not architecture
    return {"class_name": type(vae).__name__, "config": config}


def load_first_stage(source: str | Path | dict | DictConfig) -> FirstStage:
    """A first stage from a training checkpoint (.ckpt: its evaluation weights, the EMA when on), an
    exported diffusers folder (AutoencoderKL or VQModel), an original checkpoint (LDM's vq-f4 / kl-f8
    model.ckpt, a whole LDM's first stage, SD's VAE .safetensors; converted and cached by
    :func:`~ldm_lab.io.convert.converted`) or a :func:`describe` dict (architecture only)."""
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source)
    if isinstance(source, dict):
        return FirstStage(getattr(diffusers, source["class_name"]).from_config(source["config"]))
    path = Path(str(source)).expanduser()
    if path.is_file() and is_original(path):  # LDM's / taming's / SD's own checkpoint, converted once
        path = converted(path, "first_stage")
    elif path.is_file():
        return FirstStage(load_stage(path, expect=AutoencoderStage, key="model.first_stage").eval_vae)
    if (path / "config.json").is_file():
        class_name = json.loads((path / "config.json").read_text())["_class_name"]
        return FirstStage(getattr(diffusers, class_name).from_pretrained(path))
    raise FileNotFoundError(
        f"model.first_stage={source} is neither a checkpoint (.ckpt, .safetensors) nor a diffusers folder with a "
        f"config.json. Train a first stage (python run.py model=vqvae or experiment=quickstart) and pass "
        f"model.first_stage=<run>/checkpoints/last.ckpt or model.first_stage=<run>/export"
    )
