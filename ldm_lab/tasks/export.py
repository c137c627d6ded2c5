"""task=export: a training checkpoint as a diffusers folder (the stage's ``export``, ldm_lab/io/export.py).

    python run.py task=export ckpt_path=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.config.errors import ConfigError
from ldm_lab.stages.build import load_stage
from ldm_lab.tasks.trainer import build_datamodule


def run(cfg: DictConfig) -> Path:
    if cfg.ckpt_path is None:
        raise ConfigError("task=export needs ckpt_path=/path/to/checkpoint.ckpt")
    stage = load_stage(cfg.ckpt_path)
    return stage.export(Path(cfg.paths.output_dir) / "export", lambda: build_datamodule(cfg, stage.downsample_factor))
