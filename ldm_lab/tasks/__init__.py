"""One run = one task: ``task=train`` (default), ``cache_latents``, ``sample``, ``export``, ``evaluate``, ``ema_sweep``,
``plan``, ``buckets``, ``report`` or ``convert``; each has its options in ``conf/task/<task>.yaml``."""

from __future__ import annotations

from datetime import datetime
from importlib import import_module
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from ldm_lab.core.errors import ConfigError

TASKS = ("train", "cache_latents", "sample", "export", "evaluate", "ema_sweep", "plan", "buckets", "report", "convert")


def record_overrides() -> None:
    """Append this launch's overrides to ``.hydra/overrides_history.yaml``: Hydra rewrites overrides.yaml at
    every launch into the same folder (a resume), so without it the first launch's would be lost."""
    if not HydraConfig.initialized() or rank_zero_only.rank != 0:
        return
    hydra = HydraConfig.get()
    if hydra.output_subdir is None:
        return
    entry = [{"time": datetime.now().isoformat(timespec="seconds"), "overrides": list(hydra.overrides.task)}]
    history = Path(hydra.runtime.output_dir) / hydra.output_subdir / "overrides_history.yaml"
    with open(history, "a") as file:
        file.write(yaml.safe_dump(entry, sort_keys=False))


def run(cfg: DictConfig):
    """Run ``cfg.task``: the ``run(cfg)`` of its module, ``ldm_lab.tasks.<task>``."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is not a task; choose one of: {', '.join(TASKS)}")
    record_overrides()
    return import_module(f"ldm_lab.tasks.{cfg.task}").run(cfg)
