"""The latent diffusion stage: schedule, UNet config, latent cache, training, EMA, resume, sampling, export."""

from __future__ import annotations

import pickle

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import LDMPipeline
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from ldm_lab.callbacks.image_logger import preview
from ldm_lab.core.errors import ConfigError
from ldm_lab.core.weights import MissingWeightsError
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.diffusion.sampling import SamplingOptions, generate
from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder
from ldm_lab.stages.build import build_stage
from ldm_lab.stages.encoding import encode_latent_cache
from ldm_lab.tasks import cache_latents, sample, train
from ldm_lab.tasks.trainer import build_datamodule
from tests.conftest import LDM_TINY
from tests.helpers import StopAt, fit, save_tiny_first_stage


@pytest.fixture(params=["vq", "kl"])
def first_stage(request, tmp_path):
    return save_tiny_first_stage(request.param, tmp_path / f"first_stage_{request.param}")


def _cfg(compose_cfg, first_stage, *overrides):
    base = [o for o in LDM_TINY if not o.startswith("data.source.")] if "data=folder" in overrides else LDM_TINY
    return compose_cfg([*base, f"model.first_stage={first_stage}", *overrides], tiny=False)


def _stage_and_data(cfg, cached=True):
    L.seed_everything(0, verbose=False)
    stage = build_stage(cfg.model, cfg.disc)
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    if cached:
        encode_latent_cache(stage.first_stage, datamodule, cfg.paths.latent_cache)
    return stage, datamodule


def test_schedule_is_ldm_linear_in_sqrt_beta(compose_cfg):
    cfg = compose_cfg(["model=unet"], tiny=False)
    scheduler = instantiate(cfg.model.objective.noise_scheduler)
    expected = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(scheduler.betas.double(), torch.linspace(0.0015, 0.0195, 1000, dtype=torch.float64))


def test_unet_is_the_seed_000_unet(compose_cfg):
    cfg = compose_cfg(["model=unet"], tiny=False)
    unet = instantiate(cfg.model.denoiser)(in_channels=3, out_channels=3)
    assert 270e6 < sum(p.numel() for p in unet.parameters()) < 278e6
    # attention at downsample factors 2, 4, 8 (levels 1-3), none at full resolution
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D"] + ["AttnDownBlock2D"] * 3
    assert unet.down_blocks[1].attentions[0].heads == 448 // 32


def test_cache_skips_unchanged_images_and_reencodes_a_changed_one(compose_cfg, first_stage, tmp_path, monkeypatch):
    encoded = []
    original = FrozenAutoencoder.moments
    monkeypatch.setattr(FrozenAutoencoder, "moments", lambda self, x: encoded.append(len(x)) or original(self, x))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    overrides = ["data=folder", f"data.source.root={folder}", "data.num_val=2", "data.num_workers=0"]

    def cache_run():
        encoded.clear()
        stage, datamodule = _stage_and_data(_cfg(compose_cfg, first_stage, *overrides))
        datamodule.prepare_data()
        return sum(encoded), datamodule.latent_keys, stage, datamodule

    count, first, stage, datamodule = cache_run()
    assert count == 6 and len(first) == 6
    count, second, _, _ = cache_run()
    assert count == 0 and second == first
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / "3.png")
    count, third, _, _ = cache_run()
    assert count == 1 and sum(a != b for a, b in zip(first, third, strict=True)) == 1
    # the recorded scale is 1 / std of the training latents
    train_latents = [datamodule.latent_cache.get(next(iter(k.values())))
                     for k, is_val in zip(first, datamodule.is_val, strict=True) if not is_val]
    if stage.first_stage.kind == "vq":
        expected = 1 / torch.cat([z.flatten() for z in train_latents]).double().std(unbiased=False)
    else:  # the std of posterior samples, estimated from many draws
        g = torch.Generator().manual_seed(0)
        draws = [stage.first_stage.sample(z[None].expand(2000, -1, -1, -1), g) for z in train_latents]
        expected = 1 / torch.cat([d.flatten() for d in draws]).double().std()
    assert datamodule.latent_scale == pytest.approx(float(expected), rel=0.01 if stage.first_stage.kind == "kl" else 1e-6)


def test_changed_first_stage_gets_its_own_cache(compose_cfg, tmp_path):
    a = save_tiny_first_stage("vq", tmp_path / "a", seed=0)
    b = save_tiny_first_stage("vq", tmp_path / "b", seed=1)
    dirs = []
    for path in (a, b):
        _, datamodule = _stage_and_data(_cfg(compose_cfg, path))
        datamodule.prepare_data()
        dirs.append(datamodule.latent_cache.dir)
    assert dirs[0] != dirs[1] and all(any(d.glob("shard-*.safetensors")) for d in dirs)


def test_cached_and_on_the_fly_batches_give_the_same_latents(compose_cfg, first_stage):
    cfg = _cfg(compose_cfg, first_stage, "data.random_crop=false", "data.random_flip=false")
    stage, cached = _stage_and_data(cfg)
    cached.prepare_data()
    cached.setup("fit")
    _, live = _stage_and_data(cfg, cached=False)
    live.setup("fit")
    loader = cached.val_dataloader()
    batch_cached, batch_live = next(iter(loader)), next(iter(live.val_dataloader()))
    torch.testing.assert_close(batch_cached["latents"], stage.first_stage.moments(batch_live["pixel_values"]),
                               rtol=1e-4, atol=1e-4)
    # its shards are open now; a spawned worker gets the data set pickled, and opens them again
    spawned = pickle.loads(pickle.dumps(loader.dataset))
    items = next(iter(loader.batch_sampler))
    torch.testing.assert_close(torch.stack([spawned[item]["latents"] for item in items]),
                               torch.stack([loader.dataset[item]["latents"] for item in items]))


@pytest.mark.slow
def test_tiny_unet_overfits_a_handful_of_latents(compose_cfg, tmp_path):
    cfg = _cfg(compose_cfg, save_tiny_first_stage("vq", tmp_path / "vq"), "model.max_steps=300", "model.lr=2e-3",
               "model.ema_decay=null")
    stage = build_stage(cfg.model, cfg.disc)
    stage.latent_scale.fill_(1.0)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss() -> float:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return float(torch.stack([stage.loss(stage.denoiser, latents, g) for _ in range(20)]).mean())

    before = loss()
    fit(stage, [{"latents": latents}])
    assert stage.step == 300
    assert loss() < before / 5


def test_ema_follows_its_formula_and_is_what_validation_and_sampling_use(compose_cfg, first_stage):
    cfg = _cfg(compose_cfg, first_stage, "model.max_steps=3", "model.ema_decay=0.9999")
    stage = build_stage(cfg.model, cfg.disc)
    stage.latent_scale.fill_(1.0)
    initial = stage.denoiser.conv_out.weight.detach().clone()
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(pl_module.denoiser.conv_out.weight.detach().clone())

    channels = stage.first_stage.latent_channels * (2 if stage.first_stage.kind == "kl" else 1)  # KL: mean, logvar
    fit(stage, [{"latents": torch.randn(2, channels, 8, 8)}], callbacks=[Record()])
    expected = initial  # LitEma: from the initial weights, decay min(0.9999, (1 + n) / (10 + n)) at update n
    for n, weights in enumerate(snapshots, start=1):
        expected = expected + (1 - min(0.9999, (1 + n) / (10 + n))) * (weights - expected)
    torch.testing.assert_close(stage.ema.module.conv_out.weight, expected)
    assert not torch.allclose(stage.ema.module.conv_out.weight, stage.denoiser.conv_out.weight)

    latents = torch.randn(2, channels, 8, 8)
    stage._val_sums = torch.zeros(3, dtype=torch.float64)
    stage.validation_step({"latents": latents}, 0)
    g = stage._val_generator(0, 1)
    with torch.no_grad():
        expected = stage.loss(stage.ema.module, stage.latents({"latents": latents}, stage._val_generator(0, 0)), g)
    assert float(stage._val_sums[1] / 2) == pytest.approx(float(expected), rel=1e-5)
    assert stage._val_sums[0] != stage._val_sums[1]

    class Data:
        leftover_resolution = (32, 32)

    name, previews, _, _ = preview(stage.trained_model(), Data(), 2, SamplingOptions.from_config(cfg.sample), stage.seed)
    assert name == "samples"
    stage.latent_scale.fill_(1.0)
    options = SamplingOptions(num_inference_steps=2)
    with_ema = generate(stage.pipeline(), options, 2, 32, 32, torch.Generator().manual_seed(0))
    stage.ema = None  # the pipeline's denoiser is the trained one without an EMA
    with_unet = generate(stage.pipeline(), options, 2, 32, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(previews, with_ema)
    assert not torch.allclose(previews, with_unet)


def test_resume_keeps_the_latent_scale_and_the_ema(compose_cfg, first_stage, tmp_path, monkeypatch):
    cfg = _cfg(compose_cfg, first_stage, "model.max_steps=4")

    def run(callbacks=(), ckpt_path=None):
        stage, datamodule = _stage_and_data(cfg)
        fit(stage, datamodule, callbacks, ckpt_path, root_dir=tmp_path)
        return stage

    straight = run()
    ckpt = tmp_path / "stopped.ckpt"
    stopped = run(callbacks=[StopAt(2, ckpt)])
    assert stopped.step == 2
    prepare = ImageDataModule.prepare_data

    def prepare_with_another_scale(self):  # as if the data had changed since
        prepare(self)
        self.latent_scale = 123.0

    monkeypatch.setattr(ImageDataModule, "prepare_data", prepare_with_another_scale)
    resumed = run(ckpt_path=ckpt)
    assert resumed.step == 4 and float(resumed.latent_scale) == float(straight.latent_scale) != 123.0
    assert int(resumed.ema.n_averaged) == 1 + 4  # the initial weights count once
    for a, b in zip(resumed.ema.parameters(), straight.ema.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_learning_rate_scales_with_batch_accumulation_and_devices(compose_cfg, first_stage):
    cfg = _cfg(compose_cfg, first_stage, "model.scale_lr=true", "model.lr=2e-6", "data.batch_size=3",
               "model.accumulate_grad_batches=2")
    stage, datamodule = _stage_and_data(cfg)
    stage.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    stage.trainer.datamodule = datamodule
    optimizer = stage.configure_optimizers()[0][0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-6 * 3 * 2)


def test_train_sample_and_export_agree_with_ldm_pipeline(compose_cfg, first_stage, tmp_path):
    """task=train on the cache (checkpoints, sample grid, export); task=sample from the checkpoint gives
    the images LDMPipeline gives from the export, for the same seed and scheduler."""
    common = ["max_steps=4", "val_every_n_steps=2", "sample.num_images=3", "sample.batch_size=3",
              "sample.num_inference_steps=3", "sample.seed=5"]
    cfg = _cfg(compose_cfg, first_stage, *common, f"paths.output_dir={tmp_path / 'train'}")
    metrics = train.run(cfg)
    assert set(metrics) == {"loss_simple", "loss_simple_ema"}
    run_dir = tmp_path / "train"
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert (run_dir / "images" / "samples_step0000004.png").is_file()
    with Image.open(run_dir / "samples" / "grid.png") as grid:
        assert grid.size[0] > 32 and np.asarray(grid).std() > 0

    cfg = _cfg(compose_cfg, first_stage, *common, "task=sample", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
               f"paths.output_dir={tmp_path / 'sample'}")
    sample.run(cfg)
    ours = [np.asarray(Image.open(tmp_path / "sample" / "samples" / f"sample_{i:05d}.png")) for i in range(3)]
    pipeline = LDMPipeline.from_pretrained(run_dir / "export")
    theirs = pipeline(batch_size=3, num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert not np.array_equal(ours[0], ours[1])


def test_cache_latents_task_and_missing_first_stage_message(compose_cfg, first_stage):
    cache_dir = cache_latents.run(_cfg(compose_cfg, first_stage, "task=cache_latents"))
    assert any(cache_dir.glob("manifest-*.json"))
    for refused in (["model=vae_tiny"], [*LDM_TINY]):  # an autoencoder; a latent diffusion model without first stage
        with pytest.raises(ConfigError, match="model.first_stage=<first-stage checkpoint"):
            cache_latents.run(compose_cfg(["task=cache_latents", *refused], tiny=False))
    with pytest.raises(InstantiationException, match="model.first_stage"):
        build_stage(compose_cfg([*LDM_TINY], tiny=False).model, None)


def test_evaluate_task_gives_the_fid_of_samples_and_caches_the_real_statistics(compose_cfg, tmp_path, monkeypatch):
    from ldm_lab.evaluation.metrics import make_fid
    from ldm_lab.tasks import evaluate, sample_metrics
    from tests.test_evaluation import StandIn

    first_stage = save_tiny_first_stage("vq", tmp_path / "vq")
    train.run(_cfg(compose_cfg, first_stage, "max_steps=2", "val_every_n_steps=2", "sample.num_images=1",
                   "sample.num_inference_steps=1"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
        evaluate.run(_cfg(compose_cfg, first_stage, "task=evaluate", "evaluate.features=inception",
                          f"evaluate.model={checkpoint}"))
    monkeypatch.setattr(sample_metrics, "find_weights", lambda *args: tmp_path / "stand-in.pth")
    monkeypatch.setattr(sample_metrics, "make_fid", lambda *args: make_fid(StandIn()))
    common = ["task=evaluate", "evaluate.num_samples=6", "sample.batch_size=4", "sample.num_inference_steps=2"]
    first = evaluate.run(_cfg(compose_cfg, first_stage, *common, f"evaluate.model={checkpoint}",
                              f"paths.output_dir={tmp_path / 'eval'}"))
    assert first["samples"] == 6 and first["real_images"] == 8 and first["fid"] > 0
    assert len(list((tmp_path / "data" / "fid_reference").glob("*train8-32px*.npz"))) == 1
    class NotRead:
        def __iter__(self):
            pytest.fail("the real images were read again: the cached statistics were not reused")

    monkeypatch.setattr(ImageDataModule, "reference_dataloader", lambda self: NotRead())
    again = evaluate.run(_cfg(compose_cfg, first_stage, *common, f"evaluate.model={tmp_path / 'run' / 'export'}",
                              f"paths.output_dir={tmp_path / 'eval2'}"))
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-4)  # the export holds the same EMA weights
