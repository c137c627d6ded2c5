"""run.py as a user runs it: the train task end to end, bad overrides, multirun sweeps."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ldm_lab.tasks import model_config, train
from ldm_lab.tasks.report import read_scalars
from tests.conftest import ROOT, TINY


def _scalars(run_dir, tag):
    return read_scalars(run_dir / "tensorboard")[tag]


SHORT = ["max_steps=3", "val_every_n_steps=3", "trainer.log_every_n_steps=1", "model.loss.disc_start=2"]


def test_train_task_end_to_end_and_same_seed_same_losses(compose_cfg, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = compose_cfg([*SHORT, f"seed={seed}", f"paths.output_dir={tmp_path / name}"])
        metrics = train.run(cfg)
        runs[name] = _scalars(tmp_path / name, "train/total")
        assert "psnr" in metrics and "ssim" in metrics
    assert [step for step, _ in runs["a"]] == [1, 2, 3]  # logged at generator steps
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    run_dir = tmp_path / "a"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["recon_step0000000.png", "recon_step0000003.png"]
    assert (run_dir / "export" / "config.json").is_file()
    assert [step for step, _ in _scalars(run_dir, "val/psnr")][0] == 0
    assert "train/g_adv" in read_scalars(run_dir / "tensorboard")


def _hydra_config(overrides, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm_lab.config.schema import register_configs
    from tests.conftest import CONF

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("preset,model", [("vae", "ldm_lab.stages.kl_autoencoder.KLAutoencoderStage"),
                                          ("vqvae", "ldm_lab.stages.vq_autoencoder.VQAutoencoderStage")])
def test_sweep_presets_are_the_design_cards_2x4(tmp_path, preset, model):
    cfg = _hydra_config([f"sweep={preset}"], tmp_path)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params["model.lr"].split(",") == ["1e-4", "4.5e-6"]
    assert params["disc.norm_type"].split(",") == ["spectral_group", "spectral", "batch", "none"]
    assert cfg.model._target_ == model


def test_slurm_launcher_composes(tmp_path):
    cfg = _hydra_config(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=1"], tmp_path)
    assert "submitit" in cfg.hydra.launcher._target_.lower() and cfg.hydra.launcher.gpus_per_node == 1


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_misspelt_norm_type_fails_before_training(tmp_path):
    result = _run("disc.norm_type=spectral_grp", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "spectral_grp" in result.stderr
    assert "spectral_group" in result.stderr and "batch" in result.stderr and "none" in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


USER_ERRORS = {
    "wrong_kind_checkpoint": (["ckpt_path={root}/tests/fixtures/legacy_ldm.ckpt"],
                              "error: ckpt_path=.*legacy_ldm.ckpt holds a latent diffusion model .* this run trains a KL"),
    "empty_data_folder": (["data=folder", "data.source.root={tmp}/empty"], "error: no usable .* images under data.source.root="),
    "too_few_images": (["data=folder", "data.source.root={tmp}/few", "data.num_val=1"],
                       "error: 2 images cannot fill one batch of 8 .* lower data.batch_size"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_an_error_the_user_caused_is_one_line_and_exit_status_2(case, tmp_path):
    """As the config errors are shown: no Hydra traceback before the message (issue 22, item 7)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "few").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(tmp_path / "few" / f"{i}.png")
    overrides, expected = USER_ERRORS[case]
    tiny = [o for o in TINY if not o.startswith(("data.source", "data.num_val", "data.batch_size"))]
    args = [*tiny, *(o.format(root=ROOT, tmp=tmp_path) for o in overrides), f"paths.root_dir={tmp_path}",
            "data.num_workers=0", "data.source.index_workers=0" if "data=folder" in overrides else "seed=0"]
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(expected, errors[0]), result.stderr[-2000:]


def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=sample", f"sample.model={tmp_path / 'absent'}",
                             f"paths.root_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "SourceError: sample.model=" in result.stderr


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_folder(tmp_path):
    tiny = [o for o in TINY if not o.startswith("trainer.enable")]
    result = _run("-m", "model.lr=1e-3,1e-4", "disc.norm_type=spectral_group,none", "debug=short", *tiny,
                  "data.resolution=32", "data.batch_size=2", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").glob("*/*/*") if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        config = (job / ".hydra" / "config.yaml").read_text()
        lr = next(line.split(":")[1].strip() for line in config.splitlines() if line.startswith("  lr:"))
        norm = next(line.split(":")[1].strip() for line in config.splitlines() if "norm_type:" in line)
        seen.add((float(lr), norm))
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert seen == {(1e-3, "spectral_group"), (1e-3, "none"), (1e-4, "spectral_group"), (1e-4, "none")}

    # The report reads the sweep; a crashed job is a row that says why.
    sweep_dir = jobs[0].parent
    crashed = sweep_dir / "4"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "overrides.yaml").write_text("- model.lr=1e-2\n- disc.norm_type=batch\n")
    (crashed / "run.log").write_text("[2026-01-01 10:00:00,000][ldm_lab][INFO] - run folder\n"
                                     "[2026-01-01 10:00:05,000][ldm_lab][ERROR] - RuntimeError: out of memory\n")
    result = _run("task=report", f"sweep_dir={sweep_dir}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line[:3] in {f"| {i}" for i in range(5)}]
    assert len(rows) == 5
    assert sum(" ok |" in row for row in rows) == 4
    assert "FAILED" in rows[4] and "out of memory" in rows[4] and "model.lr=1e-2" in rows[4]
    assert (sweep_dir / "val_psnr.png").stat().st_size > 10_000
    assert (sweep_dir / "final_psnr_by_lr.png").stat().st_size > 10_000


def test_4060ti_preset_trains_with_bf16_checkpointing_and_accumulation(compose_cfg, tmp_path):
    cfg = compose_cfg(["precision=bf16_4060ti", "max_steps=1", "val_every_n_steps=1", "model.loss.disc_start=0",
                       "trainer.log_every_n_steps=1"])
    assert cfg.model.gradient_checkpointing and cfg.model.accumulate_grad_batches == 8
    metrics = train.run(cfg)
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    losses = _scalars(tmp_path / "run", "train/g_adv")
    assert [step for step, _ in losses] == [1]


def test_export_task_writes_a_diffusers_folder_from_a_checkpoint(compose_cfg, tmp_path):
    from diffusers import AutoencoderKL

    from ldm_lab.tasks import export

    train.run(compose_cfg(["max_steps=2", "val_every_n_steps=2"]))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = export.run(compose_cfg(["task=export", f"ckpt_path={checkpoint}", f"paths.output_dir={tmp_path / 'x'}"]))
    exported = AutoencoderKL.from_pretrained(out)
    trained = AutoencoderKL.from_pretrained(tmp_path / "run" / "export")
    for a, b in zip(exported.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    assert exported.config.scaling_factor == pytest.approx(trained.config.scaling_factor, rel=1e-5)


def test_buckets_task_writes_the_table_and_histogram(compose_cfg, tmp_path):
    from ldm_lab.tasks import buckets

    cfg = compose_cfg(["task=buckets", "+data/buckets=novelai", "data.source.min_side=256", "data.source.max_side=400",
                       "data.source.num_images=24"])
    png = buckets.run(cfg)
    table = (png.parent / "buckets.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert len(rows) == 19  # NovelAI's buckets
    assert sum(int(row.split("|")[3]) for row in rows) == 24
    assert png.stat().st_size > 10_000


def test_buckets_task_takes_an_ldm(compose_cfg, tmp_path):
    from ldm_lab.tasks import buckets
    from tests.conftest import LDM_TINY
    from tests.helpers import save_tiny_first_stage

    first_stage = save_tiny_first_stage("vq", tmp_path / "vq")
    cfg = compose_cfg(["task=buckets", *LDM_TINY, f"model.first_stage={first_stage}", "+data/buckets=novelai",
                       "data.source.min_side=256", "data.source.max_side=400", "data.source.num_images=8"], tiny=False)
    assert model_config.downsample_factor(cfg.model) == 4 * 4  # f4 first stage x the UNet's 3 levels
    assert buckets.run(cfg).is_file()


@pytest.mark.slow
def test_two_process_ddp_on_buckets_disjoint_images_per_rank_one_sync_per_step(tmp_path):
    """Two processes with 2 micro-batches per step; rank 1's last micro-batch is NaN, so both ranks skip it and
    the accumulated gradients of that step, which no backward all-reduced, are averaged by hand."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(36):
        size = (48, 32) if i % 3 == 0 else (32, 48) if i % 3 == 1 else (40, 40)
        Image.new("RGB", size, (i * 7, 100, 200 - i * 5)).save(images / f"{i}.png")
    buckets = "{max_area: 2048, min_side: 16, max_side: 64, step: 16, base_side: 32, max_ar_error: 0.5, no_upscale: false}"
    tiny = [o for o in TINY if not o.startswith(("data.source", "data.resolution"))]
    result = _run(*tiny, "trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true", "data=folder",
                  f"data.source.root={images}", "data.source.index_workers=0", f"data.buckets={buckets}",
                  "data.num_val=4", "max_steps=2", "model.accumulate_grad_batches=2", "val_every_n_steps=2",
                  f"+callbacks.seen={{_target_: tests.helpers.RecordSeenImages, dirpath: '{tmp_path}'}}",
                  f"+callbacks.syncs={{_target_: tests.helpers.CountGradientSyncs, dirpath: '{tmp_path}'}}",
                  "+callbacks.poison={_target_: tests.helpers.PoisonBatch, batch_idx: 3, rank: 1}",
                  f"paths.root_dir={tmp_path}", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [(tmp_path / f"seen_rank{rank}.txt").read_text().split("\n")[:-1] for rank in (0, 1)]
    indices = [{line.split()[0] for line in lines} for lines in seen]
    assert len(seen[0]) == len(seen[1]) == 2 * 2 * 2  # 2 steps of 2 micro-batches of 2 images on each rank
    assert not indices[0] & indices[1]
    shapes = {line.split(" ", 1)[1] for lines in seen for line in lines}
    assert len(shapes) > 1  # bucketed: more than one resolution
    syncs = [json.loads((tmp_path / f"syncs_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert syncs[0]["steps"] == 2 and syncs[0]["skipped"] == syncs[1]["skipped"] == 1
    assert syncs[0]["syncs"] == syncs[1]["syncs"] == 1  # step 1's last backward only: not one per micro-batch
    assert syncs[0]["checksum"] == syncs[1]["checksum"]  # the ranks applied the same updates


def test_scalars_are_read_in_the_order_their_files_were_written(tmp_path):
    """Each trainer call (validate, fit, validate; a resumed fit) writes its own event file, and a step logged again
    takes its latest value: writer 10 comes after writer 9 although its name sorts before it as text."""
    from torch.utils.tensorboard import SummaryWriter

    calls = {9: {"val/psnr": {0: 20.0}, "train/total": {1: 3.0, 2: 2.0, 3: 9.0}},  # stopped after step 3
             10: {"train/total": {3: 1.0}},  # resumed from step 2's checkpoint
             11: {"val/psnr": {3: 25.0}}}
    run = tmp_path / "tensorboard"
    for number, scalars in calls.items():
        with SummaryWriter(tmp_path / str(number)) as writer:
            for tag, curve in scalars.items():
                for step, value in curve.items():
                    writer.add_scalar(tag, value, step)
        run.mkdir(exist_ok=True)
        next((tmp_path / str(number)).glob("events.*")).rename(run / f"events.out.tfevents.1796529149.vm.3420.{number}")
    assert read_scalars(run) == {"val/psnr": [(0, 20.0), (3, 25.0)], "train/total": [(1, 3.0), (2, 2.0), (3, 1.0)]}
