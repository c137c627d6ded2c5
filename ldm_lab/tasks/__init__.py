"""One run = one task: ``task=train`` (default), ``task=export``, ``task=buckets`` or ``task=report``."""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig):
    from ldm_lab.tasks import buckets, export, report, train

    tasks = {"train": train.run, "export": export.run, "buckets": buckets.run, "report": report.run}
    if cfg.task not in tasks:
        raise ValueError(f"task={cfg.task} is not a task; choose one of: {', '.join(tasks)}")
    return tasks[cfg.task](cfg)
