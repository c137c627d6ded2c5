"""task=report: which job of a sweep won. Reads every job folder of a multirun and writes a markdown
table (one row per job) and two plots; a job that crashed is a row saying why, not a crash.

    python run.py task=report sweep_dir=multirun/<date>/<time>
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import matplotlib
import yaml
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ldm_lab.core.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "rfid": False, "codebook_usage": True,
                    "perplexity": True}
TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


@dataclass
class Job:
    number: int
    overrides: list[str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None

    def override(self, key: str) -> str | None:
        return next((o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0].lstrip("+~") == key), None)

    @property
    def steps(self) -> int:
        return max((step for curve in self.curves.values() for step, _ in curve), default=0)


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard folder as ``{tag: [(step, value), ...]}`` in step order, a step logged
    again (a resumed run) taking its latest value. Each trainer call (validate, fit, validate) writes its own event
    file, named ``events.out.tfevents.<time>.<host>.<pid>.<writer number>``: read in the order written (time and
    writer number as numbers; TensorBoard's EventAccumulator sorts the names as text, where writer 10 comes before
    writer 9, and drops the earlier file's steps)."""
    def written(path: Path) -> tuple[int, int]:
        parts = path.name.split(".")
        return int(parts[3]), int(parts[-1]) if parts[-1].isdigit() else 0

    curves: dict[str, dict[int, float]] = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*"), key=written):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    curves.setdefault(value.tag, {})[event.step] = value.simple_value
                elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                    curves.setdefault(value.tag, {})[event.step] = float(make_ndarray(value.tensor))
    return {tag: sorted(curve.items()) for tag, curve in curves.items()}


def read_job(folder: Path) -> Job:
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    job = Job(int(folder.name), overrides or [])
    logfile = folder / "run.log"
    lines = logfile.read_text(errors="replace").splitlines() if logfile.is_file() else []
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") for m in map(TIMESTAMP.match, lines) if m]
    if len(stamps) >= 2:
        job.seconds = (stamps[-1] - stamps[0]).total_seconds()
    if (folder / "tensorboard").is_dir():
        job.curves = {tag[4:]: curve for tag, curve in read_scalars(folder / "tensorboard").items()
                      if tag.startswith("val/")}
    if not any("validation after training" in line for line in lines):
        errors = [line for line in lines if "Error" in line or "error" in line]
        job.error = (errors[-1] if errors else "no final validation in run.log (killed or still running?)")[-200:]
    return job


def read_sweep(sweep_dir: Path) -> list[Job]:
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not folders:
        raise MissingPathError(f"sweep_dir={sweep_dir} has no numbered job folders (0, 1, ...): "
                               f"point it at a multirun folder, e.g. multirun/<date>/<time>")
    return [read_job(folder) for folder in folders]


def _best(curve: list[tuple[int, float]], metric: str) -> float:
    """Best value after training started (the step-0 validation is the untrained model)."""
    values = [v for step, v in curve if step > 0] or [v for _, v in curve]
    return max(values) if HIGHER_IS_BETTER.get(metric, True) else min(values)


def common_overrides(jobs: list[Job]) -> list[str]:
    """The overrides every job shares (the sweep's fixed settings), in the first job's order."""
    shared = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    return [o for o in jobs[0].overrides if o in shared]


def report_table(jobs: list[Job]) -> str:
    """One row per job with its own overrides; the shared ones are listed above the table."""
    common = set(common_overrides(jobs))
    metrics = [m for m in METRICS if any(m in job.curves for job in jobs)]
    header = ["job", "overrides", *[f"final {m}" for m in metrics], *[f"best {m}" for m in metrics], "steps",
              "wall time", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        finals = [f"{job.curves[m][-1][1]:.4g}" if m in job.curves else "-" for m in metrics]
        bests = [f"{_best(job.curves[m], m):.4g}" if m in job.curves else "-" for m in metrics]
        wall = f"{job.seconds / 60:.1f} min" if job.seconds is not None else "-"
        status = "ok" if job.error is None else "FAILED: " + job.error.replace("|", "/")
        lines.append("| " + " | ".join([str(job.number), " ".join(o for o in job.overrides if o not in common), *finals, *bests, str(job.steps),
                                        wall, status]) + " |")
    return "\n".join(lines)


def plot_curves(jobs: list[Job], metric: str, path: Path) -> None:
    common = set(common_overrides(jobs))
    figure, axes = plt.subplots(figsize=(8, 5))
    for job in jobs:
        if metric in job.curves:
            steps, values = zip(*job.curves[metric], strict=True)
            own = " ".join(o for o in job.overrides if o not in common)
            axes.plot(steps, values, marker="o", markersize=3, label=f"{job.number}: {own}")
    axes.set_xlabel("generator step")
    axes.set_ylabel(f"validation {metric}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_final_by_lr(jobs: list[Job], metric: str, path: Path) -> None:
    """Final metric against learning rate, one line per discriminator norm type."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        lr = job.override("model.lr")
        if metric in job.curves and lr is not None:
            lines.setdefault(job.override("disc.norm_type") or "default", []).append((float(lr),
                                                                                       job.curves[metric][-1][1]))
    figure, axes = plt.subplots(figsize=(7, 5))
    for norm_type, points in sorted(lines.items()):
        lrs, values = zip(*sorted(points), strict=True)
        axes.plot(lrs, values, marker="o", label=norm_type)
    axes.set_xscale("log")
    axes.set_xlabel("model.lr")
    axes.set_ylabel(f"final validation {metric}")
    axes.legend(title="disc.norm_type")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(cfg: DictConfig) -> Path:
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    if cfg.sweep_dir is None:
        raise ConfigError("task=report needs sweep_dir=multirun/<date>/<time>")
    sweep_dir = Path(cfg.sweep_dir)
    jobs = read_sweep(sweep_dir)
    table = report_table(jobs)
    shared = " ".join(common_overrides(jobs)) or "none"
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir}\n\nEvery job: `{shared}`\n\n{table}\n")
    plot_curves(jobs, "psnr", sweep_dir / "val_psnr.png")
    plot_final_by_lr(jobs, "psnr", sweep_dir / "final_psnr_by_lr.png")
    failed = sum(job.error is not None for job in jobs)
    log.info("%d jobs (%d failed):\n%s", len(jobs), failed, table)
    log.info("report: %s; plots: %s, %s", sweep_dir / "report.md", sweep_dir / "val_psnr.png",
             sweep_dir / "final_psnr_by_lr.png")
    return sweep_dir / "report.md"
