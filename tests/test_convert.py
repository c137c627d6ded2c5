"""Original checkpoints (CompVis latent-diffusion, taming-transformers) converted to diffusers models give
the original code's outputs: tiny random originals and their outputs are stored in tests/fixtures
(make_parity_fixtures.py says how they were made)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from diffusers import LDMPipeline
from hydra.errors import InstantiationException

from ldm_lab.config.validate import ConfigError
from ldm_lab.io.convert import cache_root, convert, convert_unet, convert_vae, detect_kind, is_original
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks import convert as convert_task
from ldm_lab.tasks import sample
from tests import parity
from tests.conftest import LDM_TINY, ROOT
from tests.parity import assert_parity, fixture


def test_the_tolerances_cover_every_measured_cpu_setting():
    """tests/parity.py's MEASURED is at least the largest error experiments/parity_tolerance measured on any
    CPU, for every comparison it measured."""
    machines = json.loads((ROOT / "experiments" / "parity_tolerance" / "results.json").read_text())["machines"]
    runs = [run for machine in machines.values() for run in machine]
    assert {name for run in runs for name in run["errors"]} == set(parity.MEASURED)
    for name, held in parity.MEASURED.items():
        assert held >= max(run["errors"][name] for run in runs), name


@pytest.mark.parity
def test_vq_f4_style_autoencoder_matches_the_original_codebook_and_all():
    data = fixture("vq")
    assert detect_kind(data["state_dict"]) == "vq"
    vae = convert_vae(data["state_dict"], "vq")
    with torch.no_grad():
        _, _, (_, _, indices) = vae.quantize(vae.encode(data["images"]).latents)
    assert torch.equal(indices.flatten(), data["indices"])
    assert data["indices"].unique().numel() > 5  # the codebook is really exercised
    for name, (ours, reference) in parity.vq_outputs().items():
        assert_parity(name, ours, reference)


@pytest.mark.parity
def test_kl_f8_style_autoencoder_matches_the_original():
    assert detect_kind(fixture("kl")["state_dict"]) == "kl"
    for name, (ours, reference) in parity.kl_outputs().items():
        assert_parity(name, ours, reference)


@pytest.mark.parity
def test_ldm_unet_matches_the_original():
    data = fixture("unet")
    assert detect_kind(data["state_dict"]) == "unet"
    unet = convert_unet(data["state_dict"], attention_head_dim=data["config"]["num_head_channels"], sample_size=8)
    assert unet.config.layers_per_block == 2 and list(unet.config.block_out_channels) == [32, 64]
    assert_parity("unet.eps", *parity.unet_outputs()["unet.eps"])
    wrong_heads = convert_unet(data["state_dict"], attention_head_dim=32, sample_size=8)  # the layout matters
    with torch.no_grad():
        wrong = wrong_heads(data["latents"], data["timesteps"]).sample
    assert parity.error(wrong, data["eps"]) > 10 * parity.MARGIN * parity.MEASURED["unet.eps"]


def _whole_ldm_checkpoint(path):
    """An LDM checkpoint as LDM's main.py saves it: first stage, UNet, its EMA (model_ema.*), the betas, and
    objects of packages this machine lacks (pytorch_lightning's callbacks)."""
    vq, unet = fixture("vq")["state_dict"], fixture("unet")["state_dict"]
    state = {f"first_stage_model.{k}": v for k, v in vq.items()}
    state.update({f"model.diffusion_model.{k}": v + 0.5 for k, v in unet.items()})  # the raw weights: not sampled with
    state.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in unet.items()})
    state["betas"] = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64).float() ** 2
    missing = types.ModuleType("pytorch_lightning_stand_in")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = missing.__name__, "ModelCheckpoint"
    missing.ModelCheckpoint = ModelCheckpoint
    sys.modules[missing.__name__] = missing
    try:
        torch.save({"state_dict": state, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}, "epoch": 3}, path)
    finally:
        del sys.modules[missing.__name__]
    return path


ORIGINAL_CONFIG = ("model:\n  params:\n    unet_config:\n      params:\n        image_size: 8\n"
                   "        model_channels: 32\n        num_head_channels: 16\n")


@pytest.mark.parity
def test_whole_ldm_checkpoint_becomes_an_ldm_pipeline_with_the_ema_unet(tmp_path):
    checkpoint = _whole_ldm_checkpoint(tmp_path / "model.ckpt")
    config = tmp_path / "original.yaml"
    config.write_text(ORIGINAL_CONFIG)
    assert is_original(checkpoint)
    folder = convert(checkpoint, tmp_path / "pipeline", config=config)
    pipeline = LDMPipeline.from_pretrained(folder)
    unet = fixture("unet")
    with torch.no_grad():
        eps = pipeline.unet(unet["latents"], unet["timesteps"]).sample
    assert_parity("unet.eps", eps, unet["eps"])
    assert pipeline.unet.config.sample_size == 8 and pipeline.vqvae.config.scaling_factor == 1.0
    pipeline.scheduler.set_timesteps(50)
    assert pipeline.scheduler.timesteps[0] == 981 and pipeline.scheduler.timesteps[-1] == 1  # LDM's DDIM spacing
    torch.testing.assert_close(pipeline.scheduler.betas, torch.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2)
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (1, 16, 16, 3)  # 8x8 latents through the tiny f2 first stage


def test_a_checkpoint_of_nothing_known_is_refused():
    with pytest.raises(ValueError, match="holds none of"):
        detect_kind({"layer.weight": torch.zeros(1)})


UNET_LIKE_FIXTURE = ["model.denoiser.block_out_channels=[32,64]", "model.denoiser.layers_per_block=2",
                     "model.denoiser.down_block_types=[DownBlock2D,AttnDownBlock2D]",
                     "model.denoiser.up_block_types=[AttnUpBlock2D,UpBlock2D]", "model.denoiser.attention_head_dim=16",
                     "model.denoiser.norm_num_groups=32", "model.denoiser.sample_size=8"]


@pytest.mark.parity
def test_lab_keys_take_original_checkpoints_converted_once(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ldm").mkdir()
    ldm = _whole_ldm_checkpoint(tmp_path / "ldm" / "model.ckpt")
    (tmp_path / "ldm" / "config.yaml").write_text(ORIGINAL_CONFIG)  # as LDM's model-zoo zips hold it
    vq = tmp_path / "vq-f4.ckpt"
    torch.save({"state_dict": fixture("vq")["state_dict"]}, vq)

    out = convert_task.run(compose_cfg(["task=convert", f"convert.source={vq}"], tiny=False))
    assert (out / "config.json").is_file() and "VQModel" in (out / "config.json").read_text()

    # model.first_stage: a whole LDM's first stage; model.denoiser_pretrained: its (EMA) UNet
    cfg = compose_cfg([*LDM_TINY, *UNET_LIKE_FIXTURE, f"model.first_stage={ldm}", f"model.denoiser_pretrained={ldm}"],
                      tiny=False)
    stage = build_stage(cfg.model, None)
    assert stage.first_stage.kind == "vq" and stage.first_stage.vae.config.num_vq_embeddings == 64
    unet = fixture("unet")
    with torch.no_grad():
        assert_parity("unet.eps", stage.denoiser(unet["latents"], unet["timesteps"]).sample, unet["eps"])
        torch.testing.assert_close(stage.ema.module.conv_out.weight, stage.denoiser.conv_out.weight)  # EMA starts there
    assert len(list(cache_root().iterdir())) == 1  # model.ckpt converted once, for both keys
    with pytest.raises(InstantiationException, match="model.denoiser_pretrained=.*another UNet2DModel.*block_out_channels"):
        build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={ldm}", f"model.denoiser_pretrained={ldm}"],
                                tiny=False).model, None)

    # model.pretrained: an autoencoder run starting from the original weights
    cfg = compose_cfg(["model=vqvae_tiny", f"model.pretrained={vq}"])
    stage = build_stage(cfg.model, cfg.disc)
    torch.testing.assert_close(stage.vae.quantize.embedding.weight, fixture("vq")["state_dict"]["quantize.embedding.weight"])

    # Stable Diffusion's VAE as a single .safetensors file (its keys are LDM's KL autoencoder's)
    from safetensors.torch import save_file

    kl = fixture("kl")
    save_file(kl["state_dict"], tmp_path / "vae-ft-mse.safetensors")
    first_stage = load_first_stage(tmp_path / "vae-ft-mse.safetensors")
    mean, logvar = first_stage.moments(kl["images"]).chunk(2, dim=1)
    assert_parity("kl.mean", mean, kl["mean"])
    assert_parity("kl.logvar", logvar, kl["logvar"])

    # sample.model: draw from the original LDM
    grid = sample.run(compose_cfg(["task=sample", f"sample.model={ldm}", "sample.num_images=2",
                                   "sample.num_inference_steps=2"], tiny=False))
    assert grid.is_file() and len(list(grid.parent.glob("sample_*.png"))) == 2


def test_evaluate_measures_original_checkpoints(compose_cfg, tmp_path, monkeypatch):
    """task=evaluate on the original code's files: a taming VQ autoencoder's reconstructions, a whole LDM's
    samples (Inception stood in for: its weights are not on this machine)."""
    from ldm_lab.evaluation.metrics import make_fid
    from ldm_lab.tasks import evaluate, sample_metrics
    from tests.test_evaluation import StandIn

    monkeypatch.setenv("LDM_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    vq = tmp_path / "vq-f4.ckpt"
    torch.save({"state_dict": fixture("vq")["state_dict"]}, vq)
    reconstruction = evaluate.run(compose_cfg(["task=evaluate", f"evaluate.model={vq}"]))
    assert reconstruction["images"] == 4 and 0 < reconstruction["psnr"] < 60  # a random autoencoder, measured

    (tmp_path / "ldm").mkdir()
    ldm = _whole_ldm_checkpoint(tmp_path / "ldm" / "model.ckpt")
    (tmp_path / "ldm" / "config.yaml").write_text(ORIGINAL_CONFIG)
    monkeypatch.setattr(sample_metrics, "find_weights", lambda *args: tmp_path / "stand-in.pth")
    monkeypatch.setattr(sample_metrics, "make_fid", lambda *args: make_fid(StandIn()))
    samples = evaluate.run(compose_cfg([*LDM_TINY, "task=evaluate", f"evaluate.model={ldm}", "evaluate.num_samples=3",
                                        "evaluate.features=inception"], tiny=False))
    assert samples["samples"] == 3 and samples["fid"] > 0 and samples["resolution"] == "32x32"
    assert len(list(cache_root().iterdir())) == 2  # each file converted once

    with pytest.raises(ConfigError, match=r"holds a denoiser \(UNet2DModel, .* or PixArtTransformer2DModel\)\. evaluate.model takes an autoencoder .* or a latent"):
        unet = tmp_path / "unet.ckpt"
        torch.save({"state_dict": fixture("unet")["state_dict"]}, unet)
        evaluate.run(compose_cfg(["task=evaluate", f"evaluate.model={unet}"]))
    with pytest.raises(ConfigError, match="evaluate.model=.*absent.ckpt does not exist"):
        evaluate.run(compose_cfg(["task=evaluate", f"evaluate.model={tmp_path / 'absent.ckpt'}"]))
