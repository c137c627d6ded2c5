"""The loggers people use (issue 21, item 7): TensorBoard, CSV and Weights & Biases, alone or together; image
grids go to every logger that takes images; a resumed run continues its W&B run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm_lab.tasks import train
from tests.conftest import ROOT, TINY

SHORT = ["max_steps=2", "val_every_n_steps=2", "trainer.log_every_n_steps=1"]


def test_tensorboard_and_csv_together_each_get_the_scalars_and_tensorboard_the_grids(compose_cfg, tmp_path):
    train.run(compose_cfg(["logger=[tensorboard,csv]", *SHORT, f"paths.output_dir={tmp_path}"]))
    with open(tmp_path / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows if row.get("train/total")] == ["1", "2"]
    assert [row["step"] for row in rows if row.get("val/psnr")] == ["0", "2", "2"]  # before, at step 2, after
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "train/total" in events.Tags()["scalars"] and "val/recon" in events.Tags()["images"]


@pytest.mark.slow
def test_wandb_offline_gets_scalars_and_grids_and_a_resume_continues_its_run(tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, "logger=[csv,wandb]", "val_every_n_steps=2", f"paths.root_dir={tmp_path}",
              f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "config")}
    for launch in (["max_steps=2"], ["max_steps=4", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]):
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *common, *launch], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[-1] for path in runs}) == 1  # one W&B run id, resumed
    assert list(runs[0].glob("files/media/images/val/recon_*.png"))  # the grids, as TensorBoard gets them
    assert any(path.suffix == ".wandb" for path in runs[1].iterdir())  # the resumed launch's scalars
