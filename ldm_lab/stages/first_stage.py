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
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm_lab.convert import converted, is_original


class FirstStage(nn.Module):
    """A diffusers autoencoder, frozen and always in eval mode."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)  # frozen: never dropout or batch statistics

    @property
    def kind(self) -> str:
        return "kl" if isinstance(self.vae, AutoencoderKL) else "vq"

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels if self.kind == "kl" else self.vae.config.vq_embed_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the cache stores per image: KL mean and log-variance stacked on channels, or VQ pre-quantization latents."""
        encoded = self.vae.encode(pixel_values)
        return encoded.latent_dist.parameters if self.kind == "kl" else encoded.latents

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
    :func:`~ldm_lab.convert.converted`) or a :func:`describe` dict (architecture only)."""
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source)
    if isinstance(source, dict):
        return FirstStage(getattr(diffusers, source["class_name"]).from_config(source["config"]))
    path = Path(str(source)).expanduser()
    if path.is_file() and is_original(path):  # LDM's / taming's / SD's own checkpoint, converted once
        path = converted(path, "first_stage")
    elif path.is_file():  # tasks import stages: imported here, not at the top, to keep that one-way
        from ldm_lab.stages.autoencoder import AutoencoderStage
        from ldm_lab.tasks.build import load_stage

        return FirstStage(load_stage(path, expect=AutoencoderStage, key="model.first_stage").eval_vae)
    if (path / "config.json").is_file():
        class_name = json.loads((path / "config.json").read_text())["_class_name"]
        return FirstStage(getattr(diffusers, class_name).from_pretrained(path))
    raise FileNotFoundError(
        f"model.first_stage={source} is neither a checkpoint (.ckpt, .safetensors) nor a diffusers folder with a "
        f"config.json. Train a first stage (python run.py model=vqvae or experiment=quickstart) and pass "
        f"model.first_stage=<run>/checkpoints/last.ckpt or model.first_stage=<run>/export"
    )
