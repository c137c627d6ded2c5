"""Memory of one training step. What a stage holds between steps (weights, EMA, optimizer states) is
counted from its tensors; gradients from its trainable parameters; activations (with the step's
transient workspace) are traced from a real step on the CPU: the CPU allocator's peak, as PyTorch's
profiler records it, over one optimizer step, minus the gradients allocated in it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ldm_lab.stages.base import TrainingStage

GIB = 1024**3


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (shared weights count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.untyped_storage().nbytes()
    return total


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclass
class HeldMemory:
    """Bytes a stage holds at the start of a step (after its first one), and the gradients a step makes."""

    weights: int
    ema: int
    optimizer: int
    gradients: int

    @classmethod
    def of(cls, stage: TrainingStage) -> HeldMemory:
        ema_tensors = [t for ema in stage.averaged_networks() for t in _module_tensors(ema)]
        ema_ptrs = {t.data_ptr() for t in ema_tensors}
        weights = [t for t in _module_tensors(stage) if t.data_ptr() not in ema_ptrs]
        weights += [t for network in stage.outside_networks() for t in _module_tensors(network)]
        optimizers = stage.trainer.optimizers if stage._trainer is not None else []
        states = [t for o in optimizers for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
        trainable = [p for p in stage.parameters() if p.requires_grad]
        return cls(tensor_bytes(weights), tensor_bytes(ema_tensors), tensor_bytes(states), tensor_bytes(trainable))


class _PeakOfSecondStep(L.Callback):
    """Profiles the CPU allocator over the second optimizer step (all its micro-batches)."""

    def __init__(self):
        self.profiler: profile | None = None
        self.peak: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cycle_start = pl_module.micro_step % pl_module.accumulate_grad_batches == 0
        if pl_module.step == 1 and cycle_start and self.profiler is None:
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _native_stderr_silenced():
                self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step == 2 and self.profiler is not None and self.peak is None:
            with _native_stderr_silenced():
                self.profiler.__exit__(None, None, None)
            self.peak = _peak_allocated(self.profiler)


@contextmanager
def _native_stderr_silenced():
    """Starting and stopping the profiler, libkineto writes 'USDT ... profiler_start/stop' and, on a machine
    without CUDA, 'ERROR ... gpuGetDeviceCount failed' straight to file descriptor 2, past Python's logging
    (and past KINETO_LOG_LEVEL): a misleading error on a CPU-only plan, so descriptor 2 goes to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_allocated(profiler: profile) -> int:
    """The highest 'Total Allocated' of the CPU allocator's memory events, relative to the start."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return max(totals, default=0)


def trace_step(stage: TrainingStage, make_batch: Callable[[], dict[str, torch.Tensor]],
               precision: str = "32-true") -> tuple[HeldMemory, int]:
    """Train ``stage`` for two optimizer steps on the CPU at ``precision`` (bf16-mixed autocasts as on
    CUDA); returns what it holds and the allocator's peak over the second step, in bytes."""
    stage.max_steps = 2
    batches = [make_batch() for _ in range(2 * stage.accumulate_grad_batches)]
    peak = _PeakOfSecondStep()
    with tempfile.TemporaryDirectory() as scratch:  # what the stage writes in its run folder (EMA snapshots) goes
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[peak], default_root_dir=scratch)
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return HeldMemory.of(stage), peak.peak
