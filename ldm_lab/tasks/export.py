"""task=export: a training checkpoint as a diffusers folder (ldm_lab/io/export.py), its networks loaded as the
diffusers models they are (ldm_lab/io/networks.py), as task=train exports the model it trained.

    python run.py task=export ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.export import export_model
from ldm_lab.io.model_sources import (
    AUTOENCODER,
    LATENT_DIFFUSION,
    load_autoencoder,
    load_latent_diffusion,
    resolve,
)
from ldm_lab.nn.downsampling import downsampling
from ldm_lab.tasks.trainer import build_datamodule


def run(cfg: DictConfig) -> Path:
    if cfg.ckpt_path is None:
        raise ConfigError("task=export needs ckpt_path=/path/to/checkpoint.ckpt")
    source = resolve(cfg.ckpt_path, "ckpt_path", (AUTOENCODER, LATENT_DIFFUSION))
    load = load_latent_diffusion if source.holds == LATENT_DIFFUSION else load_autoencoder
    model = load(source, "ckpt_path")
    return export_model(model, Path(cfg.paths.output_dir) / "export",
                        lambda: build_datamodule(cfg, downsampling(model.config)))
