"""task=plan: the memory plan of a training step, checked against a traced step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import plan
from ldm_lab.tasks.memory import tensor_bytes
from tests.helpers import save_tiny_first_stage

TINY_PLAN = ["task=plan", "model=vae_tiny", "require_weights=false", "data.resolution=128", "data.batch_size=4",
             "plan.trace_sides=[32,64]"]


@pytest.mark.slow
def test_plan_extrapolated_from_small_traces_matches_the_measured_peak(compose_cfg):
    """Traced at 32 and 64 px, predicted at 128 px; then a real step at 128 px is measured."""
    cfg = compose_cfg(TINY_PLAN, tiny=False)
    result = plan.plan(cfg)
    measured = plan.measure(cfg, 128)
    measured_total = measured["weights"] + measured["ema"] + measured["optimizer"] + measured["peak"]
    assert result["total"] == pytest.approx(measured_total, rel=0.2)
    # activations dominate here, so the extrapolation is what is being tested
    assert result["parts"]["activations and workspace"] > 0.5 * result["total"]
    assert "**Fits** the budget" in (Path(cfg.paths.output_dir) / "plan.md").read_text()


def test_held_memory_counts_adamw_states_as_twice_the_trainable_weights(compose_cfg):
    cfg = compose_cfg(TINY_PLAN + ["plan.trace_sides=[32]", "disc.ndf=8"], tiny=False)
    stage = build_stage(plan.planning_config(cfg), cfg.disc)
    from ldm_lab.tasks.memory import trace_step

    held, peak = trace_step(stage, lambda: {"pixel_values": __import__("torch").rand(2, 3, 32, 32) * 2 - 1})
    trainable = tensor_bytes(p for p in stage.parameters() if p.requires_grad)
    assert held.gradients == trainable and held.optimizer >= 2 * trainable  # exp_avg, exp_avg_sq (+ steps)
    assert held.ema == tensor_bytes(stage.ema.parameters()) + tensor_bytes(stage.ema.buffers())
    assert peak > held.gradients  # the step allocates its gradients and activations


def test_plan_of_an_ldm_without_a_first_stage_uses_a_random_one(compose_cfg, tmp_path):
    ldm_plan = ["task=plan", "model=unet_tiny", "data.resolution=64", "data.batch_size=2", "plan.trace_sides=[32]"]
    cfg = compose_cfg([*ldm_plan, "plan.first_stage=vqvae_tiny", "plan.budget_gb=0.001"], tiny=False)
    result = plan.plan(cfg)
    assert not result["fits"] and result["parts"]["EMA"] > 0 and result["parts"]["activations and workspace"] > 0
    with_stage = compose_cfg([*ldm_plan, f"model.first_stage={save_tiny_first_stage('vq', tmp_path / 'vq')}"], tiny=False)
    assert plan.plan(with_stage)["fits"]


@pytest.mark.parametrize(("preset", "encoder", "tokens", "masked"), [("t2i_4060ti", "CLIPTextModel", 77, False),
                                                                   ("t2i_dit_4060ti", "T5EncoderModel", 120, True)])
def test_text_presets_plan_offline_with_their_encoders_architecture(compose_cfg, preset, encoder, tokens, masked):
    """The pretrained encoder is a random one of its architecture and dtype, and the planned batch carries what the
    text cache serves: each caption's embedding (and T5's mask) at the encoder's full context."""
    cfg = compose_cfg([f"experiment={preset}", "task=plan", "data.source.root=unused"], tiny=False)
    stage = plan.build_for_planning(cfg)
    assert type(stage.text_encoder).__name__ == encoder and stage.text_encoder.dtype == torch.bfloat16
    assert sum(p.numel() for p in stage.text_encoder.parameters()) == pytest.approx(
        {"CLIPTextModel": 123.1e6, "T5EncoderModel": 109.6e6}[encoder], rel=0.01)
    batch = stage.planning_batch(2, 64)
    assert batch["encoder_hidden_states"].shape == (2, tokens, 768) and ("encoder_attention_mask" in batch) == masked
    assert stage.caches_text and len(batch["captions"]) == 2


def test_repa_plans_offline_with_dinov2_base_counted_where_training_runs_it(compose_cfg, tmp_path, offline_hub):
    """DINOv2-B's architecture, randomly initialised; with the latent cache the batch carries the feature cache's
    features and the encoder stays off the device, without it the encoder's weights count."""
    first_stage = save_tiny_first_stage("kl", tmp_path / "kl")
    ldm_plan = ["task=plan", "model=unet_tiny", "data.resolution=32", "data.batch_size=2", "plan.trace_sides=[32]",
                "model.representation.loss=repa", f"model.first_stage={first_stage}"]
    cached = plan.build_for_planning(compose_cfg(ldm_plan, tiny=False))
    assert sum(p.numel() for p in cached.image_encoder.parameters()) == pytest.approx(86.6e6, rel=0.01)
    assert cached.planning_batch(2, 64)["image_features"].shape == (2, 768, 4, 4) and cached.outside_networks() == []
    on_the_fly = compose_cfg([*ldm_plan, "model.latent_cache=false"], tiny=False)
    stage = plan.build_for_planning(on_the_fly)
    measured = plan.measure(on_the_fly, 32, stage)
    assert measured["weights"] >= tensor_bytes(stage.image_encoder.parameters()) + tensor_bytes(
        stage.denoiser.parameters()) + tensor_bytes(stage.representation.head.parameters())
