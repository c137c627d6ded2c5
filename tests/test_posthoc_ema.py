"""Post-hoc EMA (EDM2): the power-function EMA's update, the reconstruction of other widths from snapshots, and a
run's snapshots through training, a hard kill, resume, task=plan and task=ema_sweep, on the UNet and the DiT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from safetensors.torch import load_file

from ldm_lab.core.errors import ConfigError
from ldm_lab.io.ema_snapshots import FOLDER, reconstruct, snapshot_steps, write_snapshot
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.nn.ema import posthoc_coefficients, power_function_ema, sigma_rel_to_gamma
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import ema_sweep, plan
from ldm_lab.tasks.memory import HeldMemory, tensor_bytes
from tests.conftest import LDM_TINY
from tests.helpers import StopAt, fit, fit_latent_stage, save_tiny_first_stage

POSTHOC = ["model.ema_decay=null", "model.posthoc_ema.sigma_rels=[0.05,0.1]", "model.posthoc_ema.snapshot_every=2"]


def test_gamma_of_a_width_is_edm2s():
    # EDM2, section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for width in (0.01, 0.13, 0.25):  # the width of eq. 4 again
        gamma = sigma_rel_to_gamma(width)
        assert ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 == pytest.approx(width, rel=1e-9)
    with pytest.raises(ConfigError, match=r"sigma_rel=0.3: .* lies in \(0, 0.2887\)"):
        sigma_rel_to_gamma(0.3)


def test_power_function_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = power_function_ema(model, 0.1)
    gamma, expected = sigma_rel_to_gamma(0.1), None
    for t in range(1, 8):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update_parameters(model)
        beta = (1 - 1 / t) ** (gamma + 1)  # 0 at t = 1: the first update copies
        expected = model.weight.detach().clone() if expected is None else beta * expected + (1 - beta) * model.weight
        torch.testing.assert_close(ema.module.weight, expected)


def _trajectory_snapshots(tmp_path, dtype=torch.float32):
    """A weight trajectory (a random walk plus a slow swing) of 1000 steps under power EMAs of widths 0.05 and
    0.10, snapshotted every 50 steps; 0.03 and 0.07 tracked beside them as references."""
    model = torch.nn.Linear(16, 16, bias=False)
    widths = (0.03, 0.05, 0.07, 0.1)
    emas = {width: power_function_ema(model, width) for width in widths}
    generator = torch.Generator().manual_seed(0)
    for t in range(1, 1001):
        with torch.no_grad():
            model.weight.add_(torch.randn(16, 16, generator=generator) * 0.1 + 0.05 * np.sin(t / 80))
        for ema in emas.values():
            ema.update_parameters(model)
        if t % 50 == 0:
            write_snapshot(tmp_path, t, {"net": {0.05: emas[0.05], 0.1: emas[0.1]}}, dtype)
    return {width: ema.module.weight for width, ema in emas.items()}


def test_reconstruction_gives_the_tracked_widths_and_approximates_others(tmp_path):
    tracked = _trajectory_snapshots(tmp_path)
    spread = (tracked[0.05] - tracked[0.1]).abs().mean()
    for width in (0.05, 0.1):  # a snapshot itself: its weight is 1, the others' 0
        torch.testing.assert_close(reconstruct(tmp_path, width)["net"]["weight"], tracked[width], rtol=0, atol=1e-4)
    for width in (0.03, 0.07):  # between and below the tracked widths: EDM2's point
        error = (reconstruct(tmp_path, width)["net"]["weight"] - tracked[width]).abs().mean()
        assert error < 0.05 * spread, (width, float(error), float(spread))
    # at an earlier step only the snapshots up to it count: the same as if training had stopped there
    steps = [s for s in range(50, 501, 50) for _ in range(2)]
    weights = posthoc_coefficients(steps, [0.05, 0.1] * 10, 500, 0.1)
    np.testing.assert_allclose(weights, np.eye(20)[-1], atol=1e-6)


def test_float16_snapshots_keep_the_reconstruction_close(tmp_path):
    tracked = _trajectory_snapshots(tmp_path, torch.float16)
    spread = (tracked[0.05] - tracked[0.1]).abs().mean()
    for width in (0.03, 0.07):
        error = (reconstruct(tmp_path, width)["net"]["weight"] - tracked[width]).abs().mean()
        assert error < 0.05 * spread, (width, float(error), float(spread))


@pytest.fixture
def first_stage(tmp_path):
    return save_tiny_first_stage("kl", tmp_path / "first_stage")


def _cfg(compose_cfg, first_stage, *overrides):
    return compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", *POSTHOC, *overrides], tiny=False)


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny"])
def test_snapshots_survive_a_kill_past_the_checkpoint_and_resume_exactly(compose_cfg, first_stage, tmp_path, model):
    cfg = _cfg(compose_cfg, first_stage, f"model={model}", "model.max_steps=6")
    latents = [{"latents": torch.randn(2, 8, 8, 8)}]  # one batch an epoch: the resumed run sees what the other did

    def run(root, callbacks=(), ckpt_path=None):
        return fit_latent_stage(cfg.model, latents, root, callbacks, ckpt_path)

    straight = run(tmp_path / "straight")
    assert snapshot_steps(tmp_path / "straight" / FOLDER) == [2, 4, 6]
    assert straight.eval_denoiser is straight.ema.module and len(straight.posthoc_emas) == 1  # 0.10 evaluates
    killed = tmp_path / "killed"
    run(killed, [StopAt(2, tmp_path / "step2.ckpt", stop=False)])  # then "killed" at step 6: snapshots 4 and 6 past step 2
    (killed / FOLDER / "step-00000004.safetensors").write_bytes(b"half-written by a killed run")
    resumed = run(killed, ckpt_path=tmp_path / "step2.ckpt")
    assert resumed.step == 6 and snapshot_steps(killed / FOLDER) == [2, 4, 6]
    for step in (2, 4, 6):
        a = load_file(tmp_path / "straight" / FOLDER / f"step-{step:08d}.safetensors")
        b = load_file(killed / FOLDER / f"step-{step:08d}.safetensors")
        assert a.keys() == b.keys() and {k.split("/")[0] for k in a} == {"0.05", "0.1"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_posthoc_options_are_refused_with_the_fix(compose_cfg, first_stage, tmp_path):
    with pytest.raises(InstantiationException, match="model.ema_decay=0.9 are both set: .* add model.ema_decay=null"):
        build_stage(_cfg(compose_cfg, first_stage, "model.ema_decay=0.9").model, None)
    with pytest.raises(InstantiationException, match=r"sigma_rels=\[0.1, 0.1\]: .* at least two distinct"):
        build_stage(_cfg(compose_cfg, first_stage, "model.posthoc_ema.sigma_rels=[0.1,0.1]").model, None)
    plain = compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.max_steps=1"], tiny=False)
    stage = build_stage(plain.model, None)
    stage.latent_scale.fill_(1.0)
    stage.run_config = {"model": dict(plain.model)}
    fit(stage, [{"latents": torch.randn(2, 8, 8, 8)}], root_dir=tmp_path)
    checkpoint = {"state_dict": stage.state_dict(), "ldm_lab": {"config": {"model": dict(plain.model)}}}
    with pytest.raises(ConfigError, match=r"sigma_rels=None, this run gives \[0.05, 0.1\]: .* "
                                          r"model.posthoc_ema.sigma_rels=null"):
        build_stage(_cfg(compose_cfg, first_stage).model, None).check_resume(checkpoint, "old.ckpt")


def test_plan_counts_every_ema(compose_cfg, first_stage):
    stage = build_stage(_cfg(compose_cfg, first_stage).model, None)
    held = HeldMemory.of(stage)
    one = tensor_bytes(stage.ema.module.parameters())
    assert held.ema == pytest.approx(2 * one, rel=0.01)  # the widths 0.05 and 0.10: two copies of the denoiser
    assert plan.measure(_cfg(compose_cfg, first_stage, "task=plan"), 32)["ema"] == held.ema


@pytest.mark.slow
def test_sweep_measures_each_width_with_and_without_guidance_and_exports_the_best(compose_cfg, first_stage, tmp_path,
                                                                                   monkeypatch):
    from ldm_lab.evaluation import metrics
    from ldm_lab.tasks import train

    monkeypatch.setattr(metrics.SampleQuality, "min_class_samples", 4)
    common = ["model.conditioning=class", "data.source.num_classes=2", "data.source.num_images=16", "max_steps=6",
              "val_every_n_steps=3", "sample.num_images=2", "sample.batch_size=2", "sample.guidance_scale=3"]
    train.run(_cfg(compose_cfg, first_stage, *common, f"paths.output_dir={tmp_path / 'train'}"))
    result = ema_sweep.run(_cfg(compose_cfg, first_stage, *common, "task=ema_sweep", f"ema_sweep.run={tmp_path / 'train'}",
                                "ema_sweep.sigma_rels=[0.03,0.2]", "evaluate.num_samples=8", "sample.batch_size=8",
                                f"paths.output_dir={tmp_path / 'sweep'}"))
    written = json.loads((tmp_path / "sweep" / "ema_sweep.json").read_text())
    guided = {row["sigma_rel"]: row["fid @ guidance 3"] / row["floor_fid @ guidance 3"] for row in written["rows"]}
    unguided = {row["sigma_rel"]: row["fid @ guidance 1"] / row["floor_fid @ guidance 1"] for row in written["rows"]}
    assert set(guided) == {0.03, 0.2} and guided[0.03] != guided[0.2] and guided != unguided
    assert result["chosen"] == written["chosen"] == min(guided, key=guided.get)  # at the guidance it samples with
    assert (tmp_path / "sweep" / "ema_sweep.png").stat().st_size > 0
    table = (tmp_path / "sweep" / "ema_sweep.md").read_text()
    assert "| sigma_rel | guidance 1 | guidance 3 |" in table and "| 0.03 |" in table
    exported = load_latent_diffusion(tmp_path / "sweep" / "export", "test").unet.state_dict()
    expected = reconstruct(tmp_path / "train" / FOLDER, written["chosen"])["denoiser"]
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value)
    shutil.rmtree(tmp_path / "train" / FOLDER)  # a run trained without the post-hoc EMA
    with pytest.raises(ConfigError, match="has no EMA snapshots in ema_snapshots/: train it with"):
        ema_sweep.run(_cfg(compose_cfg, first_stage, *common, "task=ema_sweep", f"ema_sweep.run={tmp_path / 'train'}"))


def test_a_trained_text_encoder_is_snapshotted_under_the_same_widths(text_cfg, tmp_path):
    from ldm_lab.io.checkpoints import read_checkpoint
    from ldm_lab.tasks import train

    train.run(text_cfg(*POSTHOC, "max_steps=3", "val_every_n_steps=3", "sample.num_images=0"))
    run = tmp_path / "run"
    assert snapshot_steps(run / FOLDER) == [2, 3]  # every 2 steps and the last
    networks = {tuple(key.split("/")[:2]) for key in load_file(run / FOLDER / "step-00000003.safetensors")}
    assert networks == {(w, n) for w in ("0.05", "0.1") for n in ("denoiser", "text_encoder")}
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    rebuilt = reconstruct(run / FOLDER, 0.1)["text_encoder"]  # the widest: the checkpoint's evaluation EMA
    for key, value in rebuilt.items():
        torch.testing.assert_close(value, state[f"text_ema.module.{key}"], rtol=0, atol=1e-6)
