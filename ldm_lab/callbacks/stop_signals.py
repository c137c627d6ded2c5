"""A run stopped by its scheduler or its user keeps its work: SIGTERM (SLURM, Kubernetes and spot instances
send it before they kill) and SIGINT (Ctrl-C) stop training at the end of the micro-batch under way, with
``last.ckpt`` at the last completed optimizer step, and the run exits with 128 + the signal's number.

On SLURM, SIGUSR1 (``sbatch --signal=USR1@120``: the time limit or a preemption is near) does the same and then
requeues the job with ``scontrol requeue``; the requeued job finds its run folder by its job id and resumes
(conf/hydra/default.yaml, ldm_lab/tasks/train.py). This callback is the one owner of requeueing: Lightning's
own SLURM requeue is switched off (ldm_lab/tasks/trainer.py).

A signal that arrives within an accumulation cycle drops the cycle's micro-batches: the checkpoint holds the
counters, the data position and the loop state of the cycle's start (kept at every optimizer step), so a
resumed run replays them and ends bit-exact with one that was never stopped. A second signal stops at once.
This callback owns SIGTERM during training (it replaces Lightning's handler, which would carry on to the
epoch's end and exit 0); DataLoader workers ignore both signals (ldm_lab/data/datamodule.py) and leave the
stopping to the main process.
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch

from ldm_lab.config.slurm import slurm_job_id

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNAL = signal.SIGUSR1  # what sbatch --signal=USR1@<seconds> sends before the time limit


def requeue_slurm_job(job_id: str) -> None:
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        failure = result.stderr.strip() if result.returncode else None
    except OSError as error:  # no scontrol on this node's PATH
        failure = str(error)
    if failure is not None:
        log.error("scontrol requeue %s failed (%s): requeue the job yourself", job_id, failure)
    else:
        log.warning("requeued SLURM job %s: it resumes from the checkpoint when it starts again", job_id)


class RunStopped(Exception):
    """Training stopped on a signal; ``checkpoint`` holds step ``step``."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} with a checkpoint of step {step}: {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(L.Callback):
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._cycle_start: dict | None = None  # what a checkpoint holds at the last completed optimizer step

    # ----------------------------------------------------------------------------- signals
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning registered its own handlers (Trainer._run), so these replace them."""
        self.received = None
        signals = STOP_SIGNALS + ((REQUEUE_SIGNAL,) if slurm_job_id() is not None else ())
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._receive) for signum in signals}
        self._cycle_start = self._state(trainer, pl_module) if pl_module.accumulate_grad_batches > 1 else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _receive(self, signum: int, frame) -> None:
        if self.received is not None:  # a second signal: stop now, without a checkpoint
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this micro-batch, with a checkpoint of the last completed "
                    "optimizer step (send it again to stop at once)", signal.Signals(signum).name)

    # ----------------------------------------------------------------------------- stopping
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        accumulation = pl_module.accumulate_grad_batches
        if accumulation > 1 and pl_module.micro_step % accumulation == 0:  # one micro-batch a step: none dropped
            self._cycle_start = self._state(trainer, pl_module)
        if self._any_rank_received(trainer):
            self._stop(trainer, pl_module)

    def _any_rank_received(self, trainer: L.Trainer) -> bool:
        """Whether a signal reached any rank: all stop at the same micro-batch, or the others wait forever."""
        received = self.received is not None
        if trainer.world_size == 1:
            return received
        flag = torch.tensor(float(received), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def _state(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The parts of a checkpoint that move within an accumulation cycle: the stage's counters, the loop's
        progress, the datamodule's position and the buffers forward passes update (spectral norm's power
        iteration vectors, batch norm's running statistics); weights and optimizer states move only at a step."""
        probe: dict = {}
        pl_module.on_save_checkpoint(probe)
        state = {"ldm_lab": {k: v for k, v in probe["ldm_lab"].items() if k != "config"},
                 "fit_loop": trainer.fit_loop.state_dict(),
                 "buffers": {name: buffer.detach().clone() for name, buffer in pl_module.named_buffers()}}
        if trainer.datamodule is not None:
            state["datamodule"] = trainer.datamodule.state_dict()
        return copy.deepcopy(state)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self.received if self.received is not None else signal.SIGTERM  # another rank's
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None else Path(trainer.default_root_dir)
        path = folder / "last.ckpt"
        checkpoint = trainer._checkpoint_connector.dump_checkpoint()
        dropped = pl_module.micro_step % pl_module.accumulate_grad_batches
        if dropped:  # the checkpoint of the step's start: its micro-batches are replayed on resume
            start = self._cycle_start
            checkpoint["ldm_lab"].update(start["ldm_lab"])
            checkpoint["loops"]["fit_loop"] = start["fit_loop"]
            weights = checkpoint["state_dict"]
            weights.update({name: buffer for name, buffer in start["buffers"].items() if name in weights})
            if "datamodule" in start:
                checkpoint[type(trainer.datamodule).__qualname__] = start["datamodule"]
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("StopOnSignal")
        step = checkpoint["ldm_lab"]["step"]
        log.warning("%s: wrote %s at step %d%s", signal.Signals(signum).name, path, step,
                    f" ({dropped} micro-batches of the next step dropped: a resume replays them)" if dropped else "")
        if signum == REQUEUE_SIGNAL and trainer.is_global_zero:
            requeue_slurm_job(slurm_job_id())
        raise RunStopped(signum, path, step)
