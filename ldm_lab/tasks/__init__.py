"""One run = one task: ``task=train`` (default), ``task=export``, ``task=buckets``, ``task=report`` or ``task=evaluate``."""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig):
    from ldm_lab.tasks import buckets, evaluate, export, report, train

    tasks = {"train": train.run, "export": export.run, "buckets": buckets.run, "report": report.run,
             "evaluate": evaluate.run}
    if cfg.task not in tasks:
        raise ValueError(f"task={cfg.task} is not a task; choose one of: {', '.join(tasks)}")
    return tasks[cfg.task](cfg)
