"""task=export: a training checkpoint as a diffusers folder (ldm_lab/io/export.py), its networks loaded as the
diffusers models they are (ldm_lab/io/networks.py).

    python run.py task=export ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.export import export_autoencoder, export_pipeline
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
    out_dir = Path(cfg.paths.output_dir) / "export"
    if source.holds == LATENT_DIFFUSION:  # the latent scale is in the checkpoint: no data needed
        return export_pipeline(load_latent_diffusion(source, "ckpt_path"), out_dir)
    vae = load_autoencoder(source, "ckpt_path")
    return export_autoencoder(vae, build_datamodule(cfg, downsampling(vae.config)), out_dir)
