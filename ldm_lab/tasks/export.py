"""task=export: a training checkpoint as a diffusers folder (ldm_lab/io/export.py).

    python run.py task=export ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.io.export import export_autoencoder, export_pipeline
from ldm_lab.stages.build import load_stage
from ldm_lab.stages.latent_diffusion import LatentDiffusionStage
from ldm_lab.tasks.build import build_datamodule


def run(cfg: DictConfig) -> Path:
    if cfg.ckpt_path is None:
        raise ValueError("task=export needs ckpt_path=/path/to/checkpoint.ckpt")
    stage = load_stage(cfg.ckpt_path)
    if isinstance(stage, LatentDiffusionStage):
        return export_pipeline(stage, Path(cfg.paths.output_dir) / "export")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    return export_autoencoder(stage, datamodule, Path(cfg.paths.output_dir) / "export")
