"""Checkpoints, exports and latent caches written by older code still load: their config's ``_target_`` paths name
modules that have moved since, and ``read_checkpoint`` maps them; exports may lack what the pipeline records now;
caches keep their on-disk order of sides. tests/fixtures/legacy_*.ckpt were written before the moves
(tests/fixtures/make_legacy_checkpoints.sh)."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import AutoencoderKL, LDMPipeline, UNet2DModel
from PIL import Image

from ldm_lab.data.datamodule import BucketConfig, ImageDataModule
from ldm_lab.data.latent_cache import CachedLatents, LatentCache, data_fingerprint
from ldm_lab.data.sources import FolderSource
from ldm_lab.diffusion.objectives import RectifiedFlow
from ldm_lab.diffusion.sampling import SamplingOptions, assemble, generate
from ldm_lab.io.checkpoints import MOVED_MODULES, current_targets, read_checkpoint
from ldm_lab.io.export import export_pipeline
from ldm_lab.io.model_sources import load_latent_diffusion
from ldm_lab.tasks import export, sample, train
from tests.conftest import ROOT
from tests.helpers import save_tiny_first_stage

FIXTURES = ROOT / "tests" / "fixtures"
LEGACY_RUN = ["data.resolution=32", "data.batch_size=2", "data.num_val=2", "data.num_workers=0",
              "data.source.num_images=8", "data.source.min_side=32", "data.source.max_side=40",
              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "val_every_n_steps=2"]
LEGACY_KL = ["model=vae_tiny", "model.vae.block_out_channels=[8,8,8]", "model.vae.norm_num_groups=4", "disc.ndf=8",
             "disc.n_layers=1", "model.loss.perceptual_weight=0", "model.metrics.lpips=false",
             "model.metrics.rfid=false", "model.loss.disc_start=0", *LEGACY_RUN]


def test_old_target_paths_are_mapped_to_the_moved_modules():
    stored = torch.load(FIXTURES / "legacy_kl.ckpt", map_location="cpu", weights_only=False)["ldm_lab"]["config"]
    assert stored["model"]["metrics"]["_target_"] == "ldm_lab.metrics.ReconstructionMetrics"  # as written then
    config = read_checkpoint(FIXTURES / "legacy_kl.ckpt")["ldm_lab"]["config"]
    assert config["model"]["metrics"]["_target_"] == "ldm_lab.evaluation.metrics.ReconstructionMetrics"
    assert config["model"]["_target_"] == stored["model"]["_target_"]  # not moved: unchanged
    assert current_targets([{"_target_": f"{old}.Name"} for old in MOVED_MODULES]) == [
        {"_target_": f"{new}.Name"} for new in MOVED_MODULES.values()]


def test_an_old_autoencoder_checkpoint_resumes_and_exports(compose_cfg, tmp_path):
    legacy = FIXTURES / "legacy_kl.ckpt"
    train.run(compose_cfg([*LEGACY_KL, f"ckpt_path={legacy}", "max_steps=3"], tiny=False))
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["ldm_lab"]["step"] == 3
    out = export.run(compose_cfg(["task=export", f"ckpt_path={legacy}", f"paths.output_dir={tmp_path / 'x'}"]))
    vae = AutoencoderKL.from_pretrained(out)
    trained = torch.load(legacy, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(vae.decoder.conv_out.weight, trained["ema.module.decoder.conv_out.weight"])


def test_an_old_ldm_checkpoint_samples_and_exports(compose_cfg, tmp_path):
    legacy = FIXTURES / "legacy_ldm.ckpt"
    grid = sample.run(compose_cfg(["task=sample", f"sample.model={legacy}", "sample.num_images=2",
                                   "sample.num_inference_steps=2", "sample.height=32", "sample.width=32"]))
    assert len(list(grid.parent.glob("sample_*.png"))) == 2
    out = export.run(compose_cfg(["model=unet_tiny", "task=export", f"ckpt_path={legacy}",
                                  f"paths.output_dir={tmp_path / 'x'}"], tiny=False))
    pipeline = LDMPipeline.from_pretrained(out)
    assert list(pipeline.unet.config.block_out_channels) == [8, 8, 8]


def test_an_export_without_its_objective_or_pipeline_file_named_loads_and_samples_alike(tmp_path):
    """Exports written before the pipeline recorded its objective and model_index.json named pipeline.py: the lab
    tells the objective by the scheduler, and draws the same images."""
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(save_tiny_first_stage("kl", tmp_path / "vae"))
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    flow = RectifiedFlow()
    folder = export_pipeline(assemble(vae, unet, 1.3, flow, None), tmp_path / "export")
    options = SamplingOptions(sampler="heun", num_inference_steps=3)
    today = generate(load_latent_diffusion(folder, "sample.model"), options, 2, 32, 32, torch.Generator().manual_seed(1))
    index = json.loads((folder / "model_index.json").read_text())
    del index["objective"]
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "LatentDiffusionPipeline"}))
    old = load_latent_diffusion(folder, "sample.model")
    assert old.config.objective == "rectified_flow"
    torch.testing.assert_close(generate(old, options, 2, 32, 32, torch.Generator().manual_seed(1)), today, rtol=0, atol=0)


def test_latent_caches_written_before_the_height_width_order_keep_reading(tmp_path):
    """The code orders image sides (height, width) as torch does (issue 22); what caches wrote on disk keeps its
    order: each image's key per resolution reads ``WxH``, and the manifest is named by (width, height) pairs."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):  # wide and tall pictures, so the buckets are not squares
        Image.new("RGB", (96, 48) if i % 2 else (48, 96), (30 * i, 0, 0)).save(root / f"{i}.png")
    buckets = BucketConfig(max_area=64 * 32, min_side=32, max_side=64, step=32, base_side=None, max_ar_error=1.0,
                           no_upscale=False)
    datamodule = ImageDataModule(FolderSource(root), buckets=buckets, batch_size=2, num_val=2, num_workers=0)
    datamodule.setup_index()
    assert (32, 64) in datamodule.resolutions and (64, 32) in datamodule.resolutions  # (height, width)
    width_height = np.asarray([(w, h) for h, w in datamodule.resolutions])[datamodule.image_buckets]
    leftover = [datamodule.leftover_resolution[::-1]]
    assert datamodule.data_key() == data_fingerprint(datamodule.index.locations, np.concatenate([width_height, leftover]))

    cache = LatentCache(tmp_path / "cache", "first-stage")
    wide = torch.randn(4, 4, 8)
    cache.add("a-wide-one", wide)
    cache.flush()
    latents = CachedLatents(cache, [{"64x32": "a-wide-one"}])  # a manifest entry as written before
    torch.testing.assert_close(latents[(0, 32, 64, 0)]["latents"], wide)  # the wide bucket: height 32, width 64
