"""SLURM preemption and time limits (issue 21, item 3): one owner of requeueing. SIGUSR1 (sbatch --signal=USR1@120)
checkpoints and runs ``scontrol requeue``; the requeued job, which carries no ckpt_path, finds its run folder by
its job id and resumes. Tested with SLURM's environment variables set and a stand-in ``scontrol`` on PATH."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ldm_lab.io.checkpoints import read_checkpoint
from tests.conftest import ROOT, TINY


@pytest.mark.slow
def test_a_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes_in_its_folder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost"}
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = [sys.executable, str(ROOT / "run.py"), *TINY, "max_steps=6", "val_every_n_steps=100",
            f"paths.root_dir={tmp_path}"]
    usr1 = f"+callbacks.signal_at={{_target_: tests.helpers.SignalAt, micro_step: 3, signum: {int(signal.SIGUSR1)}}}"

    first = subprocess.run([*args, usr1], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "slurm-4242"  # named by the job id, not the time
    assert calls.read_text().split() == ["requeue", "4242"]  # requeued once, by the lab, not also by Lightning
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["ldm_lab"]["step"] == 4

    again = subprocess.run(args, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "requeued SLURM job 4242 (restart 1): resuming from" in again.stdout + again.stderr
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["ldm_lab"]["step"] == 6
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["slurm-4242"]
