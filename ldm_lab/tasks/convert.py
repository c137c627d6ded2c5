"""task=convert: a checkpoint of the original code as a diffusers folder (ldm_lab/io/convert.py).

    python run.py task=convert convert.source=vq-f4/model.ckpt                       # VQModel folder
    python run.py task=convert convert.source=celebahq-ldm-vq-4/model.ckpt \\
        convert.config=celebahq-ldm-vq-4/config.yaml                                 # LDMPipeline folder
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.convert import convert


def run(cfg: DictConfig) -> Path:
    options = cfg.convert
    if options.source is None:
        raise ConfigError("task=convert needs convert.source=<an original .ckpt or .safetensors file>")
    out_dir = Path(options.out_dir) if options.out_dir else Path(cfg.paths.output_dir) / "converted"
    return convert(options.source, out_dir, options.kind, options.config, options.ema)
