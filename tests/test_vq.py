"""The VQ autoencoder stage: straight-through gradients, codebook terms, codebook health, export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from diffusers import VQModel

from ldm_lab.io.export import export_model
from ldm_lab.nn.codebook import codebook_usage, restart_dead_codes, vq_losses
from ldm_lab.stages.build import build_stage
from ldm_lab.stages.vq_autoencoder import VQAutoencoderStage
from ldm_lab.tasks.trainer import build_datamodule
from tests.helpers import fit, random_batches

VQ = ["model=vqvae_tiny", "model.loss.perceptual_weight=0", "model.metrics.lpips=false", "model.metrics.rfid=false",
      "model.ema_decay=0.9", "model.vae.num_vq_embeddings=64"]


def _stage(compose_cfg, *overrides):
    cfg = compose_cfg([*VQ, *overrides])
    L.seed_everything(0, verbose=False)
    return build_stage(cfg.model, cfg.disc), cfg


def test_full_vqvae_is_ldm_vq_f4(compose_cfg):
    cfg = compose_cfg(["model=vqvae", "model.loss.perceptual_weight=0", "model.metrics.lpips=false"], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    assert isinstance(stage, VQAutoencoderStage) and isinstance(stage.vae, VQModel)
    assert stage.downsample_factor == 4
    assert stage.vae.quantize.embedding.weight.shape == (8192, 3)
    assert sum(p.numel() for p in stage.vae.parameters()) == pytest.approx(55.3e6, rel=0.01)
    assert (cfg.model.loss.disc_start, cfg.model.loss.disc_weight, cfg.model.beta) == (0, 0.75, 0.25)


def test_vq_losses_equal_their_formulas_and_route_gradients():
    latents = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).requires_grad_()
    codes = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1).requires_grad_()
    mse = (1 + 1 + 4) / 3
    loss, codebook, commitment = vq_losses(latents, codes, beta=0.25)
    assert codebook.item() == pytest.approx(mse) and commitment.item() == pytest.approx(mse)
    assert loss.item() == pytest.approx(mse + 0.25 * mse)
    codebook.backward(retain_graph=True)  # the codebook term moves the codes only
    assert latents.grad is None
    torch.testing.assert_close(codes.grad.flatten(), 2 * (codes - latents).detach().flatten() / 3)
    codes.grad = None
    commitment.backward()  # the commitment term moves the encoder only
    assert codes.grad is None
    torch.testing.assert_close(latents.grad.flatten(), 2 * (latents - codes).detach().flatten() / 3)
    legacy, _, _ = vq_losses(latents, codes, beta=0.25, legacy_beta=True)
    assert legacy.item() == pytest.approx(0.25 * mse + mse)


def test_usage_and_perplexity_on_hand_made_indices():
    counts = torch.bincount(torch.tensor([0, 0, 1, 1]), minlength=4)
    usage, perplexity = codebook_usage(counts)
    assert usage.item() == 0.5 and perplexity.item() == pytest.approx(2.0)
    usage, perplexity = codebook_usage(torch.bincount(torch.tensor([3, 3, 3]), minlength=8))
    assert usage.item() == 1 / 8 and perplexity.item() == pytest.approx(1.0)
    counts = torch.tensor([1, 2, 3, 4])
    p = counts / counts.sum()
    assert codebook_usage(counts)[1].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_dead_code_restart_moves_only_the_dead_codes_onto_encoder_outputs():
    embedding = torch.arange(12, dtype=torch.float32).view(4, 3)
    before = embedding.clone()
    recent = torch.full((5, 3), -7.0) + torch.arange(5.0).view(5, 1)
    dead = restart_dead_codes(embedding, torch.tensor([5, 0, 0, 3]), recent, threshold=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert dead.tolist() == [False, True, True, False]
    torch.testing.assert_close(embedding[[0, 3]], before[[0, 3]])
    for row in embedding[[1, 2]]:
        assert any(torch.equal(row, r) for r in recent)


def test_straight_through_estimator_passes_gradient_to_the_encoder(compose_cfg):
    stage, _ = _stage(compose_cfg)
    reconstructions, _, _ = stage.encode_decode(random_batches(1)[0]["pixel_values"])
    reconstructions.square().mean().backward()  # the reconstruction alone, no commitment term
    assert stage.vae.encoder.conv_in.weight.grad is not None
    assert stage.vae.encoder.conv_in.weight.grad.abs().max() > 0
    assert stage.vae.quantize.embedding.weight.grad is None  # codes learn from the codebook term only


def test_restart_revives_a_collapsed_codebook_during_training(compose_cfg):
    usages = {}
    for every in (0, 1):
        stage, _ = _stage(compose_cfg, "model.max_steps=1", f"model.dead_code_restart_every={every}")
        with torch.no_grad():  # collapse: every latent's nearest code is code 0
            stage.vae.quantize.embedding.weight[1:] = 1e3
            stage.vae.quantize.embedding.weight[0] = 0.0
        batches = random_batches(1)
        fit(stage, batches)
        with torch.no_grad():
            latents = stage.vae.encode(batches[0]["pixel_values"]).latents
            _, _, indices = stage._quantize(stage.vae, latents)
        usages[every] = indices.unique().numel()
    assert usages[0] == 1 and usages[1] > 10


def test_tiny_vq_training_reports_codebook_health(compose_cfg, tmp_path):
    from ldm_lab.tasks import train

    metrics = train.run(compose_cfg([*VQ, "max_steps=2", "val_every_n_steps=2"]))
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 64


def test_exported_vq_folder_reproduces_the_reconstructions(compose_cfg, tmp_path):
    stage, cfg = _stage(compose_cfg, "model.max_steps=2")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    fit(stage, datamodule)
    out = export_model(stage.trained_model(), tmp_path / "export", lambda: datamodule)
    loaded = VQModel.from_pretrained(out).eval()
    inputs = next(iter(datamodule.val_dataloader()))["pixel_values"]
    with torch.no_grad():
        got = loaded.decode(loaded.encode(inputs).latents).sample  # decode quantizes
    torch.testing.assert_close(got, stage.eval().reconstruct(inputs), rtol=1e-5, atol=1e-5)
    assert loaded.config.scaling_factor != 1.0


@pytest.mark.parametrize("norm_type", ["spectral_group", "spectral", "batch", "none"])
def test_vq_stage_trains_against_every_discriminator_norm(compose_cfg, norm_type):
    stage, _ = _stage(compose_cfg, "model.max_steps=2", f"disc.norm_type={norm_type}",
                      "model.scheduler.num_warmup_steps=0")
    disc_before = [p.detach().clone() for p in stage.discriminator.parameters()]
    fit(stage, random_batches(2))
    assert stage.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, stage.discriminator.parameters(), strict=True))


def test_resume_keeps_the_code_counts_since_the_last_restart(compose_cfg, tmp_path):
    stage, _ = _stage(compose_cfg, "model.max_steps=2", "model.dead_code_restart_every=100")
    trainer = fit(stage, random_batches(2))
    counts = stage.train_code_counts.clone()
    assert counts.sum() == 2 * 2 * 8 * 8  # 2 batches of 2 images, 8x8 latents at f4 from 32 px
    trainer.save_checkpoint(tmp_path / "vq.ckpt")
    resumed, _ = _stage(compose_cfg, "model.max_steps=2", "model.dead_code_restart_every=100")
    resumed.on_load_checkpoint(torch.load(tmp_path / "vq.ckpt", weights_only=False))
    assert torch.equal(resumed.train_code_counts, counts)
    assert "train_code_counts" not in resumed.state_dict()  # not a buffer: DDP would broadcast rank 0's
