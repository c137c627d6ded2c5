"""Checkpoints written by older code still load: their config's ``_target_`` paths name modules that have
moved since (issue 22), and ``read_checkpoint`` maps them. tests/fixtures/legacy_*.ckpt were written before
the move (tests/fixtures/make_legacy_checkpoints.sh)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, LDMPipeline

from ldm_lab.io.checkpoints import MOVED_MODULES, current_targets, read_checkpoint
from ldm_lab.tasks import export, sample, train
from tests.conftest import ROOT

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
