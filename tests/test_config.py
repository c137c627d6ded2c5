"""Every config in conf/ composes and instantiates; bad overrides fail at compose time."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.nn.denoisers import model_classes
from ldm_lab.nn.discriminator import NLayerDiscriminator
from ldm_lab.nn.text_encoders import save_tokenizer, train_tokenizer
from ldm_lab.stages.build import build_stage
from ldm_lab.tasks.trainer import build_datamodule, build_trainer
from tests.conftest import CONF
from tests.helpers import save_tiny_first_stage, save_tiny_text_encoder

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "disc", "data", "precision", "experiment", "debug")
}


def test_every_group_has_its_options():
    assert {"vae", "vae_tiny", "vqvae", "vqvae_tiny", "unet", "unet_tiny"} <= set(GROUP_OPTIONS["model"])
    assert {"fp32", "bf16", "bf16_4060ti"} <= set(GROUP_OPTIONS["precision"])
    assert {"quickstart", "sd_vae_4060ti", "celebahq_vqvae_f4", "celebahq_ldm_vq4"} <= set(GROUP_OPTIONS["experiment"])
    assert "patchgan" in GROUP_OPTIONS["disc"] and "short" in GROUP_OPTIONS["debug"]


def _offline_overrides(cfg, tmp_path) -> list[str]:
    """What a model config needs to build here: no LPIPS weights (autoencoders), a first stage (latent diffusion),
    for a text model a tiny pretrained encoder of its kind saved here, or the scratch encoder's tokenizer made
    here, instead of downloaded weights."""
    if "denoiser" not in cfg.model:
        return ["model.loss.perceptual_weight=0", "model.metrics.lpips=false"]
    overrides = [f"model.first_stage={save_tiny_first_stage('vq', tmp_path / 'first_stage')}"]
    if cfg.model.conditioning == "text" and cfg.model.text_encoder._target_.endswith(".pretrained"):
        kind = "t5" if "t5" in cfg.model.text_encoder.pretrained_model_name_or_path else "clip"
        encoder = save_tiny_text_encoder(kind, tmp_path / kind, ["a red square", "two blue lines"])
        overrides.append(f"model.text_encoder.pretrained_model_name_or_path={encoder}")
    elif cfg.model.conditioning == "text":
        tokenizer = save_tokenizer(train_tokenizer(["a red square", "two blue lines"], 300, 77), tmp_path / "tok")
        overrides.append(f"model.text_encoder.tokenizer={tokenizer}")
    return overrides


@pytest.mark.parametrize("option", GROUP_OPTIONS["model"])
def test_model_configs_instantiate(compose_cfg, option, tmp_path):
    overrides = _offline_overrides(compose_cfg([f"model={option}"], tiny=False), tmp_path)
    cfg = compose_cfg([f"model={option}", *overrides], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    if "denoiser" in cfg.model:
        assert isinstance(stage.denoiser, model_classes()[cfg.model.denoiser._target_.rpartition(".")[2]])
        assert stage.denoiser.config.in_channels == 3  # the VQ's channels
        assert all(stage.denoiser.config[k] == v for k, v in cfg.model.denoiser.items() if not k.startswith("_"))
        return
    assert isinstance(stage.vae, VQModel if option.startswith("vqvae") else AutoencoderKL)
    assert list(stage.vae.config.block_out_channels) == list(cfg.model.vae.block_out_channels)


def test_full_vae_is_sd_f8c4(compose_cfg):
    cfg = compose_cfg(["model.loss.perceptual_weight=0", "model.metrics.lpips=false"], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    assert stage.downsample_factor == 8 and stage.vae.config.latent_channels == 4
    assert sum(p.numel() for p in stage.vae.parameters()) == pytest.approx(83.65e6, rel=0.01)


@pytest.mark.parametrize("norm_type", ["spectral_group", "spectral", "batch", "none"])
def test_disc_norm_types_instantiate(compose_cfg, norm_type):
    disc = instantiate(compose_cfg([f"disc.norm_type={norm_type}"]).disc)
    assert isinstance(disc, NLayerDiscriminator) and disc.norm_type.value == norm_type


def test_vae_init_does_not_depend_on_the_discriminator_choice(compose_cfg):
    """A norm-type sweep compares discriminators on the same starting VAE."""
    import lightning as L

    stages = []
    for norm_type in ("spectral_group", "none"):
        cfg = compose_cfg([f"disc.norm_type={norm_type}"])
        L.seed_everything(0, verbose=False)
        stages.append(build_stage(cfg.model, cfg.disc))
    a, b = stages
    assert all(torch.equal(p, q) for p, q in zip(a.vae.parameters(), b.vae.parameters(), strict=True))


@pytest.mark.parametrize("option", GROUP_OPTIONS["data"])
def test_data_configs_instantiate(compose_cfg, tmp_path, option):
    overrides = [f"data={option}"] + ([f"data.source.root={tmp_path}"] if option == "folder" else [])
    cfg = compose_cfg(overrides, tiny=False)
    assert isinstance(instantiate(cfg.data), ImageDataModule)


@pytest.mark.parametrize("option", GROUP_OPTIONS["precision"])
def test_precision_configs_make_a_trainer(compose_cfg, option):
    cfg = compose_cfg([f"precision={option}"])
    trainer = build_trainer(cfg, build_stage(cfg.model, cfg.disc))
    assert trainer.precision == cfg.trainer.precision


def test_4060ti_preset_is_seed_001(compose_cfg):
    cfg = compose_cfg(["precision=bf16_4060ti"], tiny=False)
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.batch_size == 1 and cfg.model.accumulate_grad_batches == 8
    assert cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize("option", GROUP_OPTIONS["experiment"])
def test_experiments_compose_and_build(compose_cfg, tmp_path, option):
    composed = compose_cfg([f"experiment={option}"], tiny=False)
    model = composed.model
    overrides = [f"experiment={option}", *_offline_overrides(composed, tmp_path)]
    if model.get("conditioning") == "class":  # the classes training takes from the data (HF data sets are offline)
        overrides.append("model.class_names=[cat,dog,bird]")
    cfg = compose_cfg(overrides, tiny=False)
    if OmegaConf.is_missing(cfg.data.source, "root"):  # a folder the user names
        cfg = compose_cfg([*overrides, f"data.source.root={tmp_path}"], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    assert datamodule.resolution % stage.downsample_factor == 0
    build_trainer(cfg, stage)
    if model.get("conditioning") == "class":
        config = stage.denoiser.config  # K classes and the null class, in each denoiser's own terms
        classes = config.num_class_embeds - 1 if isinstance(stage.denoiser, UNet2DModel) else config.num_embeds_ada_norm
        assert classes == 3


def test_debug_short_shrinks_the_run(compose_cfg):
    cfg = compose_cfg(["debug=short"], tiny=False)
    assert cfg.max_steps <= 4 and cfg.trainer.limit_val_batches == 1 and cfg.data.resolution <= 64


def test_misspelt_norm_type_fails_at_compose_with_the_valid_values(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["disc.norm_type=spectral_grp"])
    message = str(info.value.__cause__ or info.value)
    for valid in ("spectral_group", "spectral", "batch", "none"):
        assert valid in message


@pytest.mark.parametrize("override", ["model.loss.rec_loss=l3", "model.loss.disc_loss=wgan"])
def test_bad_loss_choices_fail_at_compose(compose_cfg, override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg([override])


def test_resolution_must_divide_by_the_downsampling_factor(compose_cfg):
    cfg = compose_cfg(["data.resolution=30"])
    stage = build_stage(cfg.model, cfg.disc)
    with pytest.raises(InstantiationException, match="data.resolution gives 30x30, not divisible"):
        build_datamodule(cfg, stage.downsample_factor)


def test_sd_vae_one_training_step_runs(compose_cfg):
    """The full-size SD VAE and PatchGAN take one generator+discriminator step at 64 px."""
    from tests.helpers import fit

    cfg = compose_cfg(["model=vae", "model.max_steps=1", "model.loss.disc_start=0", "disc.ndf=64",
                       "disc.n_layers=3", "model.scheduler.num_warmup_steps=0"])
    stage = build_stage(cfg.model, cfg.disc)
    vae_before = stage.vae.decoder.conv_out.weight.detach().clone()
    disc_before = [p.detach().clone() for p in stage.discriminator.parameters()]
    fit(stage, [{"pixel_values": torch.rand(1, 3, 64, 64) * 2 - 1}])
    assert stage.step == 1
    assert not torch.equal(vae_before, stage.vae.decoder.conv_out.weight)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, stage.discriminator.parameters(), strict=True))
