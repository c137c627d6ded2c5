"""A run stopped by SIGTERM (a scheduler) or SIGINT (Ctrl-C) keeps its work (issue 21, item 2): last.ckpt at
the last completed optimizer step, exit 128 + signal, and a resume that ends bit-exact with a run never stopped."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from ldm_lab.callbacks.stop_signals import RunStopped, StopOnSignal
from ldm_lab.io.checkpoints import read_checkpoint
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks.trainer import build_datamodule
from tests.conftest import ROOT, TINY
from tests.helpers import SignalAt, fit

# An epoch is 4 micro-batches (8 training images, batch 2), 2 per optimizer step: 4 steps are 2 epochs.
OVERRIDES = ["model.max_steps=4", "model.loss.disc_start=1", "model.accumulate_grad_batches=2"]


def _run(compose_cfg, root, callbacks=(), ckpt_path=None):
    cfg = compose_cfg(OVERRIDES)
    L.seed_everything(0, verbose=False)
    stage = build_stage(cfg.model, cfg.disc)
    trainer = fit(stage, build_datamodule(cfg, stage.downsample_factor), [StopOnSignal(), *callbacks], ckpt_path,
                  root_dir=root)
    return stage, trainer


@pytest.mark.parametrize("signum,done,step", [
    (signal.SIGTERM, 2, 1),  # arrives in step 2's second micro-batch: step 2's first is dropped, mid-epoch
    (signal.SIGINT, 3, 2),   # arrives in step 2's last micro-batch: it completes, nothing is dropped
    (signal.SIGTERM, 4, 2),  # arrives in step 3's first micro-batch, the second epoch's first
], ids=["sigterm-mid-accumulation", "sigint-at-a-step", "sigterm-at-an-epoch-start"])
def test_a_signalled_run_checkpoints_its_last_step_and_resumes_bit_exact(compose_cfg, tmp_path, signum, done, step):
    straight, _ = _run(compose_cfg, tmp_path / "straight")
    previous = signal.getsignal(signum)
    with pytest.raises(RunStopped) as stopped:
        _run(compose_cfg, tmp_path / "stopped", [SignalAt(done, signum)])
    assert signal.getsignal(signum) is previous  # the handlers are given back
    assert stopped.value.exit_code == 128 + signum and stopped.value.step == step
    checkpoint = read_checkpoint(tmp_path / "stopped" / "last.ckpt")
    assert checkpoint["ldm_lab"]["step"] == step and checkpoint["ldm_lab"]["micro_step"] == 2 * step
    assert checkpoint["ImageDataModule"] == {"epoch": 0, "batches_done": 2 * step, "batch_size": 2, "world_size": 1}

    resumed, _ = _run(compose_cfg, tmp_path / "resumed", ckpt_path=str(tmp_path / "stopped" / "last.ckpt"))
    assert (resumed.step, resumed.micro_step) == (straight.step, straight.micro_step) == (4, 8)
    for key, value in straight.state_dict().items():  # VAE, discriminator, EMA
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_with_its_exit_status_and_prints_the_resume_command(tmp_path):
    """SIGINT to the whole process group, DataLoader workers included, as a terminal sends it; the printed
    command resumes in the same run folder and finishes."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("data.num_workers")]
    args = [*tiny, "max_steps=6", "val_every_n_steps=100", "model.accumulate_grad_batches=2", "data.num_workers=2",
            f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}"]
    signal_at = "+callbacks.signal_at={_target_: tests.helpers.SignalAt, micro_step: 4, signum: 2, group: true}"
    stopped = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, signal_at], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, start_new_session=True)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "DataLoader worker" not in stopped.stderr
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["ldm_lab"]["step"] == 2
    command = re.search(r"resume: (python run\.py .*)", stopped.stdout + stopped.stderr).group(1)
    resume = [a for a in shlex.split(command)[2:] if "signal_at" not in a]  # this launch's overrides, the stand-in too
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in resume and "max_steps=6" in resume
    resumed = subprocess.run([sys.executable, str(ROOT / "run.py"), *resume], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["ldm_lab"]["step"] == 6
