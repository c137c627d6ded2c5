"""Representation losses on the denoiser's features: the dispersive loss against its public release's formula, REPA's
and SRA's alignment (their losses, SRA's less noisy teacher input, REPA's image encoder), and training, resuming and
exporting with each on the UNet and the DiT."""

from __future__ import annotations

import logging
import re

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from hydra.errors import InstantiationException

from ldm_lab.core.errors import ConfigError
from ldm_lab.data.latent_cache import KeyedImages
from ldm_lab.diffusion.objectives import DDPM, RectifiedFlow
from ldm_lab.io.export import export_pipeline
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.losses.representation import as_grid, dispersive_loss, repa_loss, sra_loss
from ldm_lab.nn import image_encoders
from ldm_lab.nn.image_encoders import ImageEncoder
from ldm_lab.stages import encoding
from ldm_lab.stages.build import build_stage
from ldm_lab.stages.encoding import encode_feature_cache, encode_latent_cache
from ldm_lab.tasks import cache_latents, train
from ldm_lab.tasks.trainer import build_datamodule
from tests.conftest import LDM_TINY
from tests.helpers import StopAt, fit_latent_stage, save_tiny_dinov2, save_tiny_first_stage


def _released(z: torch.Tensor) -> torch.Tensor:
    """The release's InfoNCE-L2 code: the condensed pairwise distances twice and the diagonal's zeros, as the full
    B x B matrix of its JAX original."""
    z = z.reshape(z.shape[0], -1)
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff).mean())


def test_dispersive_loss_is_the_releases_and_spreads_features():
    features = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dispersive_loss(features), _released(features))
    torch.testing.assert_close(dispersive_loss(features, temperature=0.5), _released(features * 2**0.5))
    close = features * 0.1  # features closer together score higher; a gradient step moves them apart
    assert dispersive_loss(close) > dispersive_loss(features)
    moved = close.clone().requires_grad_(True)
    dispersive_loss(moved).backward()
    with torch.no_grad():
        assert torch.pdist((moved - moved.grad).flatten(1)).min() > torch.pdist(close.flatten(1)).min()
    assert torch.isfinite(moved.grad).all()


@pytest.fixture
def first_stage(tmp_path):
    return save_tiny_first_stage("kl", tmp_path / "first_stage")


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny"])
def test_dispersive_training_changes_the_step_resumes_exactly_and_exports_plainly(compose_cfg, first_stage, tmp_path,
                                                                                  model):
    def cfg(*overrides):
        return compose_cfg([*LDM_TINY, f"model={model}", f"model.first_stage={first_stage}", "model.max_steps=4",
                            *overrides], tiny=False)

    batches = [{"latents": torch.randn(4, 8, 8, 8)}]  # one batch an epoch: the resumed run sees what the other did

    def run(config, root, callbacks=(), ckpt_path=None):
        return fit_latent_stage(config.model, batches, root, callbacks, ckpt_path)

    dispersive = cfg("model.representation.loss=dispersive")
    straight = run(dispersive, tmp_path / "straight")
    plain = run(cfg(), tmp_path / "plain")
    pairs = zip(straight.denoiser.parameters(), plain.denoiser.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the loss reaches the weights
    stopped = tmp_path / "stopped.ckpt"
    run(dispersive, tmp_path / "killed", [StopAt(2, stopped)])
    resumed = run(dispersive, tmp_path / "killed", ckpt_path=stopped)
    for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    export = export_pipeline(resumed.pipeline(), tmp_path / "export")
    loaded = load_latent_diffusion(export, "test").unet
    assert not loaded._forward_hooks and loaded.state_dict().keys() == plain.ema.module.state_dict().keys()


def test_representation_options_are_refused_with_the_fix(compose_cfg, first_stage):
    def build(*overrides):
        return build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", *overrides], tiny=False).model,
                           None)

    with pytest.raises(InstantiationException, match="representation.block=up_block: UNet2DModel has no such "
                                                     "submodule; its blocks: .*mid_block"):
        build("model.representation.loss=dispersive", "model.representation.block=up_block")
    with pytest.raises(InstantiationException, match="representation.loss=disperse: null or one of dispersive"):
        build("model.representation.loss=disperse")
    stage = build("model=dit_tiny", "model.representation.loss=dispersive", "model.representation.block=transformer_blocks.0")
    assert stage.representation.name == "dispersive" and stage.representation.head is None


def test_alignment_losses_score_agreement_on_the_targets_grid():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 4, 4, generator=generator)
    torch.testing.assert_close(repa_loss(target * 3, target), torch.tensor(-1.0))  # cosine: the scale is free
    assert sra_loss(target, target) == 0 and sra_loss(target * 3, target) > 0  # smooth L1: it is not
    coarse = torch.randn(2, 8, 2, 2, generator=generator)  # a UNet's coarser map, resized to the encoder's grid
    resized = torch.nn.functional.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(repa_loss(coarse, target), repa_loss(resized, target))
    torch.testing.assert_close(sra_loss(coarse, target), sra_loss(resized, target))
    tokens = torch.randn(2, 16, 8, generator=generator)  # a transformer's 4 x 4 patches of 8 x 8 latents, row-major
    assert torch.equal(as_grid(tokens, (8, 8))[1, :, 2, 3], tokens[1, 2 * 4 + 3])
    with pytest.raises(ConfigError, match="token_routing, align a block outside the routed span"):
        as_grid(tokens[:, :10], (8, 8))


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_less_noisy_keeps_the_noise_at_earlier_timesteps(objective):
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, 8, generator=generator)
    if objective == "ddpm":
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        model, timesteps = DDPM(scheduler), torch.tensor([999, 500, 10, 0])
        noisy = scheduler.add_noise(latents, noise, timesteps)

        def noised(earlier):
            return scheduler.add_noise(latents, noise, earlier)
    else:
        model, timesteps = RectifiedFlow(), torch.tensor([1000.0, 500.0, 10.0, 0.0])
        noisy = latents + (timesteps / 1000).view(-1, 1, 1, 1) * (noise - latents)

        def noised(earlier):
            return latents + (earlier / 1000).view(-1, 1, 1, 1) * (noise - latents)
    moved, earlier = model.less_noisy(latents, noisy, timesteps, 0.2, generator)
    assert ((timesteps - earlier >= 0) & (timesteps - earlier <= 200) & (earlier >= 0)).all()
    assert (earlier[:2] < timesteps[:2]).all()
    torch.testing.assert_close(moved, noised(earlier), rtol=0, atol=1e-5)


@pytest.fixture
def dinov2(tmp_path):
    return save_tiny_dinov2(tmp_path / "dinov2")


@pytest.mark.parametrize(("model", "loss"), [("unet_tiny", "sra"), ("dit_tiny", "sra"), ("unet_tiny", "repa"),
                                             ("dit_tiny", "repa")])
def test_alignment_trains_its_head_resumes_exactly_and_exports_without_it(compose_cfg, first_stage, dinov2, tmp_path,
                                                                          model, loss):
    config = compose_cfg([*LDM_TINY, f"model={model}", f"model.first_stage={first_stage}", "model.max_steps=4",
                          f"model.representation.loss={loss}", f"model.representation.encoder={dinov2}"], tiny=False)
    # cached latents and, for REPA, the feature cache's patch features: 8 x 8 latents of 32 px images, 16 px a patch
    batch = {"latents": torch.randn(4, 8, 8, 8), "image_features": torch.randn(4, 32, 2, 2).half()}

    def run(root, callbacks=(), ckpt_path=None):
        return fit_latent_stage(config.model, [batch], root, callbacks, ckpt_path)

    L.seed_everything(0, verbose=False)
    initial = build_stage(config.model, None).representation.head.state_dict()
    straight = run(tmp_path / "straight")
    assert all(not torch.equal(initial[k], v) for k, v in straight.representation.head.state_dict().items())
    stopped = tmp_path / "stopped.ckpt"
    run(tmp_path / "killed", [StopAt(2, stopped)])
    resumed = run(tmp_path / "killed", ckpt_path=stopped)
    for x, y in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    saved = torch.load(stopped, weights_only=False)
    assert any(k.startswith("representation.head.") for k in saved["state_dict"])
    assert not any("image_encoder" in k for k in saved["state_dict"])  # frozen, kept out as LPIPS is
    assert len(saved["optimizer_states"][0]["state"]) == len(list(resumed.denoiser.parameters())) + \
        len(list(resumed.representation.head.parameters()))
    export = export_pipeline(resumed.pipeline(), tmp_path / "export")
    loaded = load_latent_diffusion(export, "test").unet
    assert not loaded._forward_hooks and loaded.state_dict().keys() == resumed.denoiser.state_dict().keys()
    plain = compose_cfg([*LDM_TINY, f"model={model}", f"model.first_stage={first_stage}"], tiny=False).model
    with pytest.raises(ConfigError, match=f"trained with model.representation.loss={loss}, this run gives None"):
        build_stage(plain, None).check_resume(saved, stopped)


def test_repa_encodes_the_pixels_of_a_batch_without_cached_features(compose_cfg, first_stage, dinov2, tmp_path,
                                                                    monkeypatch):
    config = compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.max_steps=1", "model.latent_cache=false",
                          "model.representation.loss=repa", f"model.representation.encoder={dinov2}"], tiny=False)
    read, forward = [], ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, pixels: read.append(pixels.shape) or forward(self, pixels))
    fit_latent_stage(config.model, [{"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1}], tmp_path)
    assert read == [(2, 3, 32, 32)]


@pytest.mark.parametrize("registers", [0, 2])
def test_image_encoder_gives_patch_features_on_the_images_grid(tmp_path, registers):
    encoder = image_encoders.load(str(save_tiny_dinov2(tmp_path / "dinov2", registers=registers)), patch_pixels=8)
    pixels = torch.rand(2, 3, 48, 32) * 2 - 1
    features = encoder(pixels)
    assert features.shape == (2, 32, 6, 4) and not features.requires_grad
    resized = torch.nn.functional.interpolate((pixels + 1) / 2, size=(24, 16), mode="bicubic", antialias=True)
    hidden = encoder.model(pixel_values=(resized - encoder.mean) / encoder.std).last_hidden_state
    torch.testing.assert_close(features[1, :, 5, 3], hidden[1, 1 + registers + 5 * 4 + 3])  # row-major, tokens skipped


def test_alignment_options_are_refused_with_the_fix(compose_cfg, first_stage, offline_hub):
    def build(*overrides):
        return build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", *overrides], tiny=False).model,
                           None)

    with pytest.raises(InstantiationException, match="loss=sra aligns with the EMA's features, and this run keeps no "
                                                     "EMA: set model.ema_decay"):
        build("model.representation.loss=sra", "model.ema_decay=null")
    with pytest.raises(InstantiationException, match="huggingface-cli download facebook/dinov2-base .*"
                                                     "model.representation.encoder=/path/to/copy"):
        build("model.representation.loss=repa")
    with pytest.raises(InstantiationException, match="teacher_block=up_blocks.9: UNet2DModel has no such submodule"):
        build("model.representation.loss=sra", "model.representation.teacher_block=up_blocks.9")
    planned = build("model.representation.loss=repa", "model.representation.encoder_weights=random")
    assert planned.image_encoder.width == 768  # DINOv2-B's architecture, offline


def test_feature_cache_holds_the_encoders_features_under_the_latents_keys(compose_cfg, first_stage, dinov2, tmp_path,
                                                                           caplog):
    config_overrides = [*LDM_TINY, f"model.first_stage={first_stage}", "model.representation.loss=repa",
                        f"model.representation.encoder={dinov2}", f"paths.latent_cache={tmp_path / 'cache'}"]
    config = compose_cfg(config_overrides, tiny=False)
    stage = build_stage(config.model, None)
    datamodule = build_datamodule(config)
    encode_latent_cache(stage.first_stage, datamodule, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger=encoding.__name__):
        cache = encode_feature_cache(stage.image_encoder, datamodule, tmp_path / "cache")
    assert re.search(r"feature cache .*: 12 images encoded by this process, 12 seen; 0.3 KB per sample \(0.125x its "
                     r"cached latent moments' 2.0 KB\)", caplog.text)  # 32 x 2 x 2 float16, 8 x 8 x 8 float32
    pixels = KeyedImages(datamodule.pixel_dataset())
    for item in datamodule.encoding_batches()[0][:2]:  # each image's entry: the encoder's features of its latents' crop
        image = pixels[item]
        torch.testing.assert_close(cache.get(image["key"]).float(), stage.image_encoder(image["pixel_values"][None])[0],
                                   rtol=0, atol=1e-3)  # stored in float16
    assert {k for keys in datamodule.latent_keys for k in keys.values()} <= set(cache.shards)
    caplog.clear()
    again = build_datamodule(config)
    encode_latent_cache(stage.first_stage, again, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger=encoding.__name__):
        encode_feature_cache(stage.image_encoder, again, tmp_path / "cache")
    assert ": 0 images encoded by this process" in caplog.text  # the next run reads them all
    batch = next(iter(datamodule.train_dataloader()))
    height, width = batch["latents"].shape[2:]
    assert batch["image_features"].shape == (len(batch["latents"]), 32, height * 4 // 16, width * 4 // 16)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=encoding.__name__):  # task=cache_latents fills both caches
        cache_latents.run(compose_cfg([*config_overrides, "task=cache_latents"], tiny=False))
    assert "latent cache" in caplog.text and ": 0 images encoded by this process, 12 seen" in caplog.text


@pytest.mark.parametrize(("model", "loss"), [("unet_text_tiny", "repa"), ("dit_text_tiny", "sra")])
def test_text_models_train_with_alignment_through_the_train_task(text_cfg, dinov2, tmp_path, caplog, model, loss):
    """UNet2DConditionModel with REPA (its feature cache beside the latent cache), PixArt with SRA (its teacher
    reads the prompt embeddings of the text encoder trained with it)."""
    caplog.set_level(logging.INFO, logger=encoding.__name__)
    train.run(text_cfg(f"model={model}", f"model.representation.loss={loss}", f"model.representation.encoder={dinov2}",
                       "max_steps=2", "val_every_n_steps=2", "sample.num_images=1", "sample.num_inference_steps=2"))
    run = tmp_path / "run"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("representation.head.") for k in saved["state_dict"])
    assert (run / "export" / "model_index.json").is_file()
    assert (loss == "repa") == ("feature cache" in caplog.text)
