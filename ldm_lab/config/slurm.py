"""Which SLURM job this run is: the id ``scontrol requeue`` takes and the run folder a requeued job finds again."""

from __future__ import annotations

import os


def slurm_job_id() -> str | None:
    """The job's id, an array task's as <array job>_<task>; None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_run_folder(default: str) -> str:
    """``${run_folder:<default>}`` (conf/hydra/default.yaml): ``slurm-<job id>`` for a SLURM job, so a requeued
    job finds its own folder; else ``default``."""
    job_id = slurm_job_id()
    return default if job_id is None else f"slurm-{job_id}"
