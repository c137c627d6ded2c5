"""One run = one task: ``task=train`` (default), ``cache_latents``, ``sample``, ``export``, ``evaluate``,
``plan``, ``buckets`` or ``report``."""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig):
    from ldm_lab.tasks import buckets, cache_latents, evaluate, export, plan, report, sample, train

    tasks = {"train": train.run, "cache_latents": cache_latents.run, "sample": sample.run, "export": export.run,
             "evaluate": evaluate.run, "plan": plan.run, "buckets": buckets.run, "report": report.run}
    if cfg.task not in tasks:
        raise ValueError(f"task={cfg.task} is not a task; choose one of: {', '.join(tasks)}")
    return tasks[cfg.task](cfg)
