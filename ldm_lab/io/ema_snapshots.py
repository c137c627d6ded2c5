"""Post-hoc EMA snapshots (EDM2, Karras et al. 2024, section 3.2): every N steps the power-function EMAs of the
trained networks are written, whole or not at all, to ``<run>/ema_snapshots/step-<step>.safetensors``; afterwards
the EMA of any width at any snapshot's step is their least-squares combination (:func:`reconstruct`)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ldm_lab.core.atomic import atomic_write
from ldm_lab.core.errors import MissingPathError
from ldm_lab.nn.ema import posthoc_coefficients

log = logging.getLogger(__name__)

FOLDER = "ema_snapshots"  # in the run folder
_NAME = re.compile(r"step-(\d+)\.safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def snapshot_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.safetensors"


def snapshot_steps(folder: Path) -> list[int]:
    """The steps of the snapshots in ``folder``, ascending."""
    folder = Path(folder)
    found = (_NAME.fullmatch(path.name) for path in folder.glob("step-*.safetensors")) if folder.is_dir() else ()
    return sorted(int(match.group(1)) for match in found if match)


def write_snapshot(folder: Path, step: int, averages: dict[str, dict[float, torch.nn.Module]],
                   dtype: torch.dtype) -> Path:
    """Write the EMAs ``averages[network][sigma_rel]`` (their networks' state dicts, as ``dtype``) at ``step``."""
    tensors = {f"{sigma_rel!r}/{network}/{key}": value.detach().to("cpu", dtype).contiguous()
               for network, by_width in averages.items() for sigma_rel, ema in by_width.items()
               for key, value in ema.module.state_dict().items() if value.is_floating_point()}
    metadata = {"step": str(step), "sigma_rels": json.dumps(sorted({s for w in averages.values() for s in w}))}
    path = snapshot_path(folder, step)
    atomic_write(path, lambda file: file.write(save(tensors, metadata)))
    return path


def remove_after(folder: Path, step: int) -> list[int]:
    """Remove the snapshots past ``step`` (a run killed after its last checkpoint left them); the steps removed."""
    removed = [later for later in snapshot_steps(folder) if later > step]
    for later in removed:
        snapshot_path(folder, later).unlink()
    return removed


def tracked_widths(folder: Path, step: int) -> list[float]:
    """The widths of the EMAs in the snapshot at ``step``."""
    with safe_open(snapshot_path(folder, step), "pt") as file:
        return json.loads(file.metadata()["sigma_rels"])


def reconstruct(folder: Path, sigma_rel: float, step: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts, per network, of the power-function EMA of width ``sigma_rel`` at ``step`` (None: the last
    snapshot's), summed in float32 over the snapshots up to ``step`` with :func:`posthoc_coefficients`' weights."""
    steps = snapshot_steps(folder)
    if step is not None:
        steps = [s for s in steps if s <= step]
    if not steps:
        raise MissingPathError(f"{folder} holds no EMA snapshots{f' up to step {step}' if step is not None else ''}: "
                               f"train with model.posthoc_ema.sigma_rels=[...] (it writes them every "
                               f"model.posthoc_ema.snapshot_every steps)")
    at = steps[-1] if step is None else step
    sources = [(s, width) for s in steps for width in tracked_widths(folder, s)]
    weights = posthoc_coefficients([s for s, _ in sources], [w for _, w in sources], at, sigma_rel)
    weight = dict(zip(sources, weights.tolist(), strict=True))
    result: dict[str, dict[str, torch.Tensor]] = {}
    for s in steps:
        with safe_open(snapshot_path(folder, s), "pt") as file:
            for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                width, network, key = name.split("/", 2)
                term = file.get_tensor(name).float() * weight[(s, float(width))]
                entry = result.setdefault(network, {})
                entry[key] = entry[key] + term if key in entry else term
    return result


class SnapshotWriter:
    """Writes a run's snapshots into ``folder``: every ``every_n_steps`` optimizer steps and at the last, from the
    rank that ``writes`` (every rank holds the same averages). :meth:`start` first removes the snapshots past the
    step a run resumes at: a hard kill leaves them behind ``last.ckpt``, and the steps trained again would
    otherwise count twice."""

    def __init__(self, folder: Path, every_n_steps: int, dtype: torch.dtype, writes: bool):
        self.folder, self.every_n_steps, self.dtype, self.writes = Path(folder), every_n_steps, dtype, writes
        self._written: int | None = None

    def start(self, step: int) -> None:
        if self.writes:
            removed = remove_after(self.folder, step)
            if removed:
                log.warning("removed %d EMA snapshots past the checkpoint's step %d (steps %s): they are trained "
                            "again", len(removed), step, ", ".join(map(str, removed)))
        self._written = step if step in snapshot_steps(self.folder) else None

    def write(self, step: int, averages: dict[str, dict[float, torch.nn.Module]], max_steps: int,
              last: bool = False) -> None:
        """The snapshot at ``step`` if it is due (``last``: the run's final step) and not written yet."""
        if step == 0 or step == self._written or not (last or step % self.every_n_steps == 0):
            return
        self._written = step
        if not self.writes:
            return
        path = write_snapshot(self.folder, step, averages, self.dtype)
        if len(snapshot_steps(self.folder)) == 1:
            size, count = path.stat().st_size, -(-max_steps // self.every_n_steps)
            log.info("EMA snapshots: %.1f MB each, every %d steps: %d by step %d (%.2f GB) in %s", size / 1e6,
                     self.every_n_steps, count, max_steps, size * count / 1e9, self.folder)
