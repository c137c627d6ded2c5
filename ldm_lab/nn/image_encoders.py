"""The frozen image encoder REPA aligns a denoiser's features with (Yu et al. 2024): DINOv2 (Oquab et al. 2023)
through transformers (``Dinov2Model``, or ``Dinov2WithRegistersModel``), from a hub id or a local folder. Its patch
features of the clean image are the target: images are resized so that one encoder patch covers ``patch_pixels``
image pixels (REPA: a 256-px image at 224 px, 16 x 16 patches of DINOv2's 14 px) and normalised as its image
processor does. Kept out of the stage's module tree, so out of every checkpoint (as LPIPS is); task=plan counts it.

Never the synthetic feature network of ldm_lab/nn/feature_net.py: the offline FID is measured in its embedding, and
aligning to it would game the metric."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, Dinov2Config

from ldm_lab.core.errors import ConfigError
from ldm_lab.core.weights import MissingWeightsError, offline_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's image processor's
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# The architectures of the DINOv2 encoders by hub id (their config.json: 14-px patches, positions for 518 px), for
# task=plan offline
ARCHITECTURES = {
    "facebook/dinov2-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "facebook/dinov2-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "facebook/dinov2-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}
COMMON = {"patch_size": 14, "image_size": 518}


class ImageEncoder(nn.Module):
    """A frozen DINOv2 ``model``: (B, 3, H, W) pixels in [-1, 1] -> (B, width, H / patch_pixels, W / patch_pixels)
    patch features (after its final layer norm, without the class and register tokens)."""

    def __init__(self, model: nn.Module, name: str, patch_pixels: int = 16):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.patch_pixels = name, patch_pixels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an image of ``height`` x ``width`` pixels."""
        return max(1, round(height / self.patch_pixels)), max(1, round(width / self.patch_pixels))

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)  # frozen: never dropout

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows, columns = self.grid(*pixel_values.shape[2:])
        patch = self.model.config.patch_size
        images = F.interpolate((pixel_values.float() + 1) / 2, size=(rows * patch, columns * patch), mode="bicubic",
                               align_corners=False, antialias=True)
        images = ((images - self.mean) / self.std).to(self.model.dtype)
        hidden = self.model(pixel_values=images).last_hidden_state
        tokens = hidden[:, 1 + getattr(self.model.config, "num_register_tokens", 0):]
        return tokens.transpose(1, 2).reshape(len(tokens), self.width, rows, columns).float()

    def describe(self) -> dict:
        """What makes its features (with its weights, the feature cache's key)."""
        config = self.model.config
        return {"kind": "image_features", "class_name": type(self.model).__name__, "name": self.name,
                "config": config.to_dict(), "patch_pixels": self.patch_pixels, "dtype": "float16"}


def load(name: str, weights: str = "pretrained", patch_pixels: int = 16) -> ImageEncoder:
    """The DINOv2 encoder ``name`` (a hub id or a local folder); ``weights="random"``: its architecture randomly
    initialised (what task=plan builds offline: the same memory; aligning to it would teach nothing)."""
    if weights not in ("pretrained", "random"):
        raise ConfigError(f"model.representation.encoder_weights={weights}: pretrained or random (task=plan's)")
    if weights == "random":
        return ImageEncoder(AutoModel.from_config(_architecture(name)), name, patch_pixels)
    try:
        config = AutoConfig.from_pretrained(name)
        _check_type(name, config.model_type)
        model = AutoModel.from_pretrained(name)
    except OSError as error:
        raise MissingWeightsError(
            f"could not load model.representation.encoder={name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Without network access, download it where you have one "
            f"(huggingface-cli download {name} --local-dir /path/to/copy), bring it here and set "
            f"model.representation.encoder=/path/to/copy; or align without an encoder: "
            f"model.representation.loss=sra or dispersive") from error
    return ImageEncoder(model, name, patch_pixels)


def _architecture(name: str):
    known = {hub_id: functools.partial(Dinov2Config, **sizes, **COMMON) for hub_id, sizes in ARCHITECTURES.items()}
    config = offline_config(name, known, "model.representation.encoder")
    _check_type(name, config.model_type)
    return config


def _check_type(name: str, model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model.representation.encoder={name} is a {model_type} model; REPA aligns with DINOv2 "
                          f"({', '.join(MODEL_TYPES)}), e.g. facebook/dinov2-base")
