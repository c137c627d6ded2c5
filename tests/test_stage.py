"""The autoencoder stage trained through a real Lightning Trainer on tiny models."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from hydra.errors import InstantiationException

from ldm_lab.io.export import export_model
from ldm_lab.nn.ema import ema_with_warmup
from ldm_lab.stages.base import NonFiniteLossError, TrainingStage
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks.trainer import build_datamodule
from tests.helpers import StopAt, fit, random_batches


def _stage(compose_cfg, *overrides):
    cfg = compose_cfg(list(overrides))
    L.seed_everything(0, verbose=False)
    return build_stage(cfg.model, cfg.disc), cfg


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_accumulation_matches_one_larger_batch(compose_cfg, monkeypatch):
    """k micro-batches of n, accumulated, give the step one batch of k*n gives (noise-free posterior,
    before disc_start, where every term is a batch mean). Plain SGD, so the step is the gradient."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    common = ["model.max_steps=1", "model.loss.disc_start=100", "model.scheduler.num_warmup_steps=0",
              "model.optimizer._target_=torch.optim.SGD", "~model.optimizer.betas",
              "~model.optimizer.weight_decay", "model.lr=1.0", "model.gradient_clip_val=null"]
    initial, _ = _stage(compose_cfg, *common)
    accumulated, _ = _stage(compose_cfg, *common, "model.accumulate_grad_batches=2")
    large, _ = _stage(compose_cfg, *common, "model.accumulate_grad_batches=1")
    batches = random_batches(2, batch_size=2)
    fit(accumulated, batches)
    fit(large, [{"pixel_values": torch.cat([b["pixel_values"] for b in batches])}])
    assert accumulated.step == large.step == 1 and accumulated.micro_step == 2
    for (name, p0), a, b in zip(initial.vae.named_parameters(), accumulated.vae.parameters(),
                                large.vae.parameters(), strict=True):
        torch.testing.assert_close(a - p0, b - p0, rtol=1e-3, atol=1e-7, msg=name)
    # one micro-batch alone would have stepped differently
    half, _ = _stage(compose_cfg, *common)
    fit(half, batches[:1])
    assert not torch.allclose(half.vae.decoder.conv_out.weight, large.vae.decoder.conv_out.weight, atol=1e-5)


@pytest.mark.parametrize("stop_at", [1, 2], ids=["mid-epoch", "epoch-end"])
def test_resumed_run_ends_where_a_straight_run_ends(compose_cfg, tmp_path, stop_at):
    """Random crops and flips on (data.random_crop and random_flip default to true): replayed too."""
    overrides = ["model.max_steps=4", "model.loss.disc_start=1", "model.accumulate_grad_batches=2"]
    ckpt = tmp_path / "stopped.ckpt"

    def run(callbacks=(), ckpt_path=None):
        stage, cfg = _stage(compose_cfg, *overrides)
        trainer = fit(stage, build_datamodule(cfg, stage.downsample_factor), callbacks, ckpt_path)
        return stage, trainer

    straight, straight_trainer = run()
    stopped, _ = run(callbacks=[StopAt(stop_at, ckpt)])  # an epoch is 4 micro-batches = 2 steps
    assert stopped.step == stop_at and ckpt.exists()
    resumed, resumed_trainer = run(ckpt_path=str(ckpt))

    assert (resumed.step, resumed.micro_step) == (straight.step, straight.micro_step) == (4, 8)
    for key, value in _params(straight).items():  # VAE, discriminator (spectral-norm vectors too), EMA
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    for a, b in zip(straight_trainer.optimizers, resumed_trainer.optimizers, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"][0]["lr"] == pytest.approx(sb["param_groups"][0]["lr"])
        for pid, state in sa["state"].items():
            assert int(state["step"]) == int(sb["state"][pid]["step"])
            torch.testing.assert_close(state["exp_avg_sq"], sb["state"][pid]["exp_avg_sq"], rtol=0, atol=1e-9)
    assert int(resumed.ema.n_averaged) == int(straight.ema.n_averaged) == 1 + 4  # the initial weights count once
    assert not torch.equal(stopped.vae.decoder.conv_out.weight, straight.vae.decoder.conv_out.weight)


def test_export_loads_in_diffusers_and_reproduces_reconstructions(compose_cfg, tmp_path):
    stage, cfg = _stage(compose_cfg, "model.max_steps=2")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    fit(stage, datamodule)
    out = export_model(stage.trained_model(), tmp_path / "export", lambda: datamodule)
    loaded = AutoencoderKL.from_pretrained(out).eval()
    inputs = next(iter(datamodule.val_dataloader()))["pixel_values"]
    expected = stage.eval().reconstruct(inputs)
    with torch.no_grad():
        got = loaded.decode(loaded.encode(inputs).latent_dist.mode()).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert loaded.config.scaling_factor != 0.18215 and loaded.config.scaling_factor > 0
    # the EMA weights were exported, not the live ones
    torch.testing.assert_close(loaded.decoder.conv_out.weight, stage.ema.module.decoder.conv_out.weight)
    assert not torch.equal(loaded.decoder.conv_out.weight, stage.vae.decoder.conv_out.weight)


def test_kl_term_is_the_weighted_batch_mean_of_the_posterior_kl(compose_cfg):
    stage, _ = _stage(compose_cfg, "model.kl_weight=0.25")
    inputs = random_batches(1)[0]["pixel_values"]
    _, reg_loss, logs = stage.encode_decode(inputs)
    expected = stage.vae.encode(inputs).latent_dist.kl()
    assert expected.shape == (2,)
    assert reg_loss.item() == pytest.approx(0.25 * expected.mean().item(), rel=1e-5)
    assert logs["kl"].item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_ema_update_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = ema_with_warmup(model, decay=0.9)
    start = model.weight.detach().clone()
    expected = start.clone()
    for n in range(1, 31):  # LitEma: update n averages with min(decay, (1 + n) / (10 + n)), from the initial weights
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    assert (1 + 30) / (10 + 30) < 0.9 < (1 + 90) / (10 + 90)  # the warm-up ramps below the cap here ...
    for n in range(31, 101):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        expected = min(0.9, (1 + n) / (10 + n)) * expected + (1 - min(0.9, (1 + n) / (10 + n))) * model.weight.detach()
    torch.testing.assert_close(ema.module.weight, expected)  # ... and holds at the cap once past it
    assert not torch.allclose(ema.module.weight, model.weight) and not ema.module.weight.requires_grad


def test_validation_uses_the_ema_weights(compose_cfg):
    stage, _ = _stage(compose_cfg, "model.max_steps=3", "model.ema_decay=0.99", "model.scheduler.num_warmup_steps=0")
    fit(stage, random_batches(3))
    inputs = random_batches(1)[0]["pixel_values"]
    stage.eval()
    with torch.no_grad():
        ema_rec = stage.ema.module.decode(stage.ema.module.encode(inputs).latent_dist.mode()).sample
        live_rec = stage.vae.decode(stage.vae.encode(inputs).latent_dist.mode()).sample
    torch.testing.assert_close(stage.reconstruct(inputs), ema_rec)
    assert not torch.allclose(ema_rec, live_rec)


def test_non_finite_loss_is_skipped_and_counted(compose_cfg):
    stage, _ = _stage(compose_cfg, "model.max_steps=3")
    batches = random_batches(4)
    batches[1] = {"pixel_values": torch.full_like(batches[1]["pixel_values"], float("nan"))}
    fit(stage, batches)
    assert stage.nonfinite_skipped == 1 and stage.step == 3 and stage.micro_step == 4
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_gradients_are_clipped_under_bf16_with_a_fused_optimizer(compose_cfg):
    """What a CUDA run gets (speed.fused_adamw: fused AdamW; precision=bf16): Lightning's own clip_gradients
    refused the pair at the first step (make gpu-check, experiments/gpu/NVIDIA_H200.md)."""
    norms = []

    class RecordNorms(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    stage, _ = _stage(compose_cfg, "model.max_steps=2", "model.loss.disc_start=0", "model.gradient_clip_val=0.01",
                      "+model.optimizer.fused=true", "+model.disc_optimizer.fused=true")
    fit(stage, random_batches(2), callbacks=[RecordNorms()], precision="bf16-mixed")
    assert stage.step == 2 and len(norms) == 4  # generator and discriminator, two steps
    assert max(norms) <= 0.01 * 1.001


def test_non_finite_losses_in_a_row_stop_the_run_with_a_checkpoint(compose_cfg, tmp_path):
    stage, _ = _stage(compose_cfg, "model.max_steps=5", "model.max_consecutive_nonfinite=2")
    nan = {"pixel_values": torch.full((2, 3, 32, 32), float("nan"))}
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        fit(stage, [nan, nan, nan], root_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "nonfinite.ckpt", weights_only=False)
    assert checkpoint["ldm_lab"]["nonfinite_skipped"] == 2


def test_decoder_only_fine_tuning_keeps_the_encoder(compose_cfg):
    stage, _ = _stage(compose_cfg, "model.max_steps=2", "model.decoder_only=true",
                      "model.scheduler.num_warmup_steps=0")
    encoder = _params(stage.vae.encoder)
    quant = _params(stage.vae.quant_conv)
    decoder = _params(stage.vae.decoder)
    fit(stage, random_batches(2))
    assert all(torch.equal(v, stage.vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert all(torch.equal(v, stage.vae.quant_conv.state_dict()[k]) for k, v in quant.items())
    assert any(not torch.equal(v, stage.vae.decoder.state_dict()[k]) for k, v in decoder.items())


def test_training_starts_from_a_pretrained_diffusers_folder(compose_cfg, tmp_path):
    source, _ = _stage(compose_cfg)
    with torch.no_grad():
        source.vae.decoder.conv_out.weight.fill_(0.5)
    source.vae.save_pretrained(tmp_path / "pretrained")
    stage, _ = _stage(compose_cfg, f"model.pretrained={tmp_path / 'pretrained'}")
    assert torch.all(stage.vae.decoder.conv_out.weight == 0.5)
    assert torch.all(stage.ema.module.decoder.conv_out.weight == 0.5)


def test_unloadable_pretrained_model_says_how_to_get_it(compose_cfg, tmp_path, monkeypatch):
    with pytest.raises(InstantiationException, match="sd-vae-ft-mse does not exist. model.pretrained takes an autoencoder"):
        _stage(compose_cfg, f"model.pretrained={tmp_path / 'missing' / 'sd-vae-ft-mse'}")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)  # a hub id, without a network
    with pytest.raises(InstantiationException, match="hf download stabilityai/sd-vae-ft-mse .*model.pretrained=/path/to"):
        _stage(compose_cfg, "model.pretrained=stabilityai/sd-vae-ft-mse")


def test_inference_loading_needs_no_lpips_weights_and_builds_no_stage(compose_cfg, tmp_path, monkeypatch):
    from torchvision.models import vgg16

    from ldm_lab.io.model_sources import load_autoencoder
    from ldm_lab.nn.discriminator import NLayerDiscriminator

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    weights.parent.mkdir(parents=True)
    torch.save(vgg16().state_dict(), weights)
    stage, _ = _stage(compose_cfg, "model.loss.perceptual_weight=0.5", "model.max_steps=2")
    assert stage.loss.perceptual is not None
    trainer = fit(stage, random_batches(2))  # two steps: the EMA's first update copies the weights
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    weights.unlink()  # an export or evaluation machine without the VGG16 weights
    for built in (TrainingStage, NLayerDiscriminator):  # what only training uses
        monkeypatch.setattr(built, "__init__", lambda *args, name=built.__name__, **kwargs: pytest.fail(f"{name} built"))
    loaded = load_autoencoder(tmp_path / "trained.ckpt", "evaluate.model")
    assert torch.equal(loaded.decoder.conv_out.weight, stage.eval_vae.decoder.conv_out.weight)  # the EMA's
    assert not torch.equal(loaded.decoder.conv_out.weight, stage.vae.decoder.conv_out.weight)


@pytest.mark.parametrize("model", ["vae_tiny", "vqvae_tiny"])
def test_preview_is_the_validation_images_over_their_ema_reconstructions(compose_cfg, model):
    from ldm_lab.callbacks.image_logger import preview

    stage, cfg = _stage(compose_cfg, f"model={model}", "model.max_steps=2")
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    fit(stage, datamodule)
    name, images, per_row, captions = preview(stage.trained_model(), datamodule, 2, None, stage.seed)
    inputs = datamodule.preview_images(2)
    with torch.no_grad():
        expected = stage.eval().reconstruct(inputs)  # validation's: the VQ stage's own quantization
    assert (name, per_row, captions) == ("recon", 2, None)
    torch.testing.assert_close(images, torch.cat([inputs, expected]))
    stage.ema = None  # the live weights reconstruct otherwise
    with torch.no_grad():
        assert not torch.allclose(images[2:], stage.reconstruct(inputs))
