"""make gpu-check: its CPU path, and the measuring code it runs on a GPU, driven with tiny stages on the CPU."""

from __future__ import annotations

import subprocess

import pytest

from experiments.bench.bench_stages import compose_cfg, moments, pixels, time_steps
from experiments.gpu import gpu_check
from ldm_lab.config.schema import register_configs
from tests.conftest import ROOT


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    before = sorted((ROOT / "experiments" / "gpu").iterdir())
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "needs a CUDA device" in result.stdout and "Nothing was measured" in result.stdout
    assert sorted((ROOT / "experiments" / "gpu").iterdir()) == before  # no report written


@pytest.mark.slow
def test_speed_and_option_rows_measure_every_stage_and_option(monkeypatch):
    register_configs()
    tiny = ["data.batch_size=2", "trainer.precision=32-true"]
    monkeypatch.setattr(gpu_check, "STAGES", [
        ("KL tiny", ["model=vae_tiny", *tiny], 32, False),
        ("VQ tiny", ["model=vqvae_tiny", *tiny], 32, False),
        ("LDM tiny, cached latents", ["model=unet_tiny", "plan.first_stage=vqvae_tiny", *tiny], 32, True),
        ("broken", ["model=no_such_model"], 32, False)])
    monkeypatch.setattr(gpu_check, "OPTIONS", ["channels_last", "compile", "sdpa"])
    speed = gpu_check.speed_rows(compose_cfg, time_steps, pixels, moments, steps=1, peak=1e12)
    assert len(speed) == 2 + 4 and all(float(row.split("|")[5]) > 0 for row in speed[2:5])  # images/s
    cells = [cell.strip() for cell in speed[5].split("|")[1:-1]]  # a failing stage is a row saying why; the rest ran
    assert cells[0] == "broken" and cells[1].startswith("failed:") and "no_such_model" in cells[1] and len(cells) == 7
    options = gpu_check.option_rows(compose_cfg, time_steps, pixels, moments, steps=1, compile_too=False)
    assert [row.split("|")[1].strip() for row in options[2:]] == ["channels_last"] * 2 + ["sdpa"] * 2
    batches = gpu_check.batch_rows(compose_cfg, time_steps, moments, steps=1, peak=1e12)
    assert [int(row.split("|")[2]) for row in batches[2:]] == [2, 8]  # the preset's micro-batch and 4x it
    profiled = gpu_check.profile_rows(compose_cfg, moments)
    assert "wall time of one profiled step" in profiled[2] and len(profiled) == 4 + 8
