"""The frozen first stage of a latent diffusion model (LDM, Rombach et al. 2022, sec. 3): a trained KL
or VQ autoencoder seen as an encoder to latent *moments*, which the latent cache stores, and a decoder.

- KL (AutoencoderKL): the moments are the posterior's mean and log-variance (diffusers'
  ``latent_dist.parameters``), so every epoch can draw a fresh z ~ q(z|x).
- VQ (VQModel): the moments are the pre-quantization latents; the UNet is trained on them and
  decoding quantizes, as in LDM-VQ-4 (seed 000).
"""

from __future__ import annotations

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm_lab.core.errors import ConfigError
from ldm_lab.core.fingerprint import fingerprint
from ldm_lab.nn.downsampling import downsampling

AUTOENCODERS = (AutoencoderKL, VQModel)  # the first stages the lab trains and loads


def kind_of(vae: nn.Module) -> str:
    return "kl" if isinstance(vae, AutoencoderKL) else "vq"


@torch.no_grad()
def reconstruct(vae: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: KL decodes the posterior's mode, VQ decodes the quantized latents."""
    encoded = vae.encode(pixel_values)
    return vae.decode(encoded.latent_dist.mode() if kind_of(vae) == "kl" else encoded.latents).sample


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

    def add(self, other: LatentScale) -> None:
        """The sums of ``other``, over other latents (a share another process encoded)."""
        self.count += other.count
        self.total += other.total
        self.squares += other.squares
        self.variance += other.variance

    @property
    def scaling_factor(self) -> float:
        mean = self.total / self.count
        scale = float(1.0 / np.sqrt((self.squares + self.variance) / self.count - mean**2))
        if not np.isfinite(scale) or scale <= 0:
            raise ConfigError(f"the latent scale 1/std of {self.count} latent values is {scale}: the latents are "
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


class FrozenAutoencoder(nn.Module):
    """A diffusers autoencoder, frozen and always in eval mode: a latent diffusion model's first stage."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    @classmethod
    def from_description(cls, description: dict) -> FrozenAutoencoder:
        """The architecture :meth:`describe` gives, with random weights (a state dict fills them)."""
        return cls(getattr(diffusers, description["class_name"]).from_config(description["config"]))

    def train(self, mode: bool = True) -> FrozenAutoencoder:
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

    def reconstruct(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return reconstruct(self.vae, pixel_values)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents to pixels in [-1, 1] (a VQModel quantizes them first)."""
        return self.vae.decode(latents).sample

    def describe(self) -> dict:
        """Class and config: what rebuilds the architecture (weights come from a state dict)."""
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        config.pop("scaling_factor", None)  # measured, not architecture
        return {"class_name": type(self.vae).__name__, "config": config}

    def fingerprint(self) -> str:
        """A hash of the architecture and the weights: the latent cache's key for this first stage."""
        return fingerprint(self.describe(), self.vae)

