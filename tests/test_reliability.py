"""No lost work, no silent wrong result: checkpoints, caches and bad input as a new user meets them
(issue 11). Each test fails on the code before it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra.errors import InstantiationException
from PIL import Image

from ldm_lab.config.validate import ConfigError, check_config, check_group_choices
from ldm_lab.core.atomic import FILE_MODE
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.index import index_folder
from ldm_lab.data.latent_cache import LatentCacheError
from ldm_lab.data.sources import IMAGE_EXTENSIONS, FolderSource
from ldm_lab.diffusion.objectives import DDPM
from ldm_lab.diffusion.pipeline import denoise
from ldm_lab.io.checkpoints import CheckpointError
from ldm_lab.io.model_sources import load_first_stage
from ldm_lab.stages.base import NonFiniteValidationError
from ldm_lab.stages.build import build_stage
from ldm_lab.stages.encoding import encode_latent_cache
from ldm_lab.tasks import train
from ldm_lab.tasks.trainer import build_datamodule, build_trainer
from tests import parity
from tests.conftest import CONF, LDM_TINY, ROOT, TINY
from tests.helpers import fit, random_batches, save_tiny_first_stage
from tests.parity import assert_parity

SHORT = ["max_steps=3", "val_every_n_steps=2"]


def _step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["ldm_lab"]["step"]


# ------------------------------------------------------------------------------------------- work lost
def test_checkpoint_survives_a_temporary_folder_on_another_disk_and_a_full_disk(compose_cfg, tmp_path, monkeypatch):
    """Lightning staged checkpoints in the system's temporary folder; on another disk its "rename" is a copy,
    and a full checkpoint disk truncated last.ckpt. The lab's writes never leave the checkpoint's folder."""
    cfg = compose_cfg()
    stage = build_stage(cfg.model, cfg.disc)
    checkpoint_io = build_trainer(cfg, stage).strategy.checkpoint_io
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    checkpoint_io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    rename, replace = os.rename, os.replace

    def across_disks(move):  # a rename between folders of different file systems fails with EXDEV
        def moved(src, dst, *args, **kwargs):
            if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return move(src, dst, *args, **kwargs)
        return moved

    def disk_full(*args, **kwargs):  # copying bytes onto the checkpoint disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", across_disks(rename))
    monkeypatch.setattr(os, "replace", across_disks(replace))
    monkeypatch.setattr(os, "sendfile", disk_full)
    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    checkpoint_io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=False)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE


def test_a_failed_checkpoint_write_keeps_the_previous_file(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg()
    checkpoint_io = build_trainer(cfg, build_stage(cfg.model, cfg.disc)).strategy.checkpoint_io
    path = tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    save = torch.save

    def half_then_full(obj, file, *args, **kwargs):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint_io.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", save)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class RecordLastStep(L.Callback):
    """The step last.ckpt holds at the start of every training batch."""

    def __init__(self, path):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(_step_of(self.path) if self.path.exists() else None)


def test_last_checkpoint_holds_every_validation_and_the_final_step(compose_cfg, tmp_path):
    """Lightning rewrote last.ckpt only with a new best; here the monitor ("step", minimised) never improves."""
    cfg = compose_cfg(["max_steps=5", "val_every_n_steps=2", "+callbacks.checkpoint.monitor=step",
                       "+callbacks.checkpoint.mode=min"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    record = RecordLastStep(last)
    stage = build_stage(cfg.model, cfg.disc)
    trainer = build_trainer(cfg, stage)
    trainer.callbacks.insert(0, record)
    trainer.fit(stage, datamodule=build_datamodule(cfg, stage.downsample_factor))
    assert record.steps == [None, None, 2, 2, 4]  # before steps 1..5: the latest validation each time
    assert _step_of(last) == 5  # and the final step, between validations
    assert _step_of(last.parent / "best.ckpt") == 2


@pytest.mark.slow
def test_run_folder_is_not_overwritten_and_a_finished_run_resumes_without_training(tmp_path):
    """As a user runs it: a finished run; a second run into its folder is refused; a resume of it trains no
    further step, prints the step it loaded, and the overrides of every launch are kept."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer.enable")]
    args = [*tiny, *SHORT, f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}", "require_weights=false"]
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    best = (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    assert _step_of(run_dir / "checkpoints" / "last.ckpt") == 3

    again = _run(*args, "seed=1")
    assert again.returncode != 0 and "overwrite=true" in again.stderr and "already holds a run" in again.stderr
    assert (run_dir / "checkpoints" / "best.ckpt").read_bytes() == best

    resumed = _run(*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "run.log").read_text()
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} at step 3" in log
    assert "validation after training (step 3)" in log.split("resuming from")[-1]
    history = yaml.safe_load((run_dir / ".hydra" / "overrides_history.yaml").read_text())
    assert len(history) == 3 and "seed=1" in history[1]["overrides"] and "ckpt_path" in history[2]["overrides"][-1]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_max_steps_zero_and_a_finished_run_train_no_step(compose_cfg, tmp_path):
    cfg = compose_cfg()
    stage = build_stage(cfg.model, cfg.disc)
    stage.max_steps = 0
    before = {k: v.clone() for k, v in stage.vae.state_dict().items()}
    fit(stage, random_batches(2))
    assert stage.step == 0 and stage.micro_step == 0
    assert all(torch.equal(before[k], v) for k, v in stage.vae.state_dict().items())

    stage.max_steps = 2
    fit(stage, random_batches(2))
    checkpoint = tmp_path / "finished.ckpt"
    fit(stage, random_batches(2)).save_checkpoint(checkpoint)  # already at max_steps: nothing more
    assert stage.step == 2 and stage.micro_step == 2
    resumed = build_stage(cfg.model, cfg.disc)
    resumed.max_steps = 2
    fit(resumed, random_batches(2), ckpt_path=checkpoint)
    assert resumed.step == 2 and resumed.micro_step == 2


# ------------------------------------------------------------------------------------------- silently wrong
def test_resuming_with_another_batch_size_or_accumulation_is_refused_naming_it(compose_cfg, tmp_path):
    """The epoch position counts batches of the stopped run's size, and an LDM scales its learning rate by
    batch x accumulation x processes: a resume that changes them is refused, not silently off (issue 21, item 6)."""
    run = [f"paths.output_dir={tmp_path / 'run'}", "val_every_n_steps=2"]
    train.run(compose_cfg([*run, "max_steps=2"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resume = [*run, "max_steps=4", f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"data.batch_size = 2, this run gives 1: .* Resume with data.batch_size = 2, "
                                          r"or start a new run from its weights: model.pretrained="):
        train.run(compose_cfg([*resume, "data.batch_size=1"]))
    with pytest.raises(ConfigError, match=r"model.accumulate_grad_batches=1, this run gives 2"):
        train.run(compose_cfg([*resume, "model.accumulate_grad_batches=2"]))
    train.run(compose_cfg(resume))  # the same settings resume
    assert _step_of(last) == 4


def test_resuming_an_ldm_with_another_first_stage_is_refused(compose_cfg, tmp_path):
    a = save_tiny_first_stage("vq", tmp_path / "first_stage_a", seed=0)
    b = save_tiny_first_stage("vq", tmp_path / "first_stage_b", seed=1)
    overrides = [*LDM_TINY, "max_steps=2", "val_every_n_steps=2", "sample.num_images=1"]
    train.run(compose_cfg([*overrides, f"model.first_stage={a}", f"paths.output_dir={tmp_path / 'ldm'}"], tiny=False))
    last = tmp_path / "ldm" / "checkpoints" / "last.ckpt"
    resume = [*overrides, "max_steps=4", f"ckpt_path={last}", f"paths.output_dir={tmp_path / 'ldm'}"]
    with pytest.raises(CheckpointError) as refused:
        train.run(compose_cfg([*resume, f"model.first_stage={b}"], tiny=False))
    assert f"model.first_stage={a}" in str(refused.value) and f"model.first_stage={b}" in str(refused.value)
    train.run(compose_cfg([*resume, f"model.first_stage={a}"], tiny=False))  # the same first stage resumes
    assert _step_of(last) == 4

    # A latent diffusion checkpoint serves as its first stage (as an original whole LDM does); an autoencoder
    # is no UNet: the one resolver says what the source holds and what the key takes (ldm_lab/io/model_sources.py).
    reused = build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={last}"], tiny=False).model, None)
    assert reused.first_stage.fingerprint() == load_first_stage(a).fingerprint()
    with pytest.raises(InstantiationException, match=r"model.denoiser_pretrained=.*first_stage_a holds an autoencoder .*"
                                                     r"model.denoiser_pretrained takes a denoiser"):
        build_stage(compose_cfg([*LDM_TINY, f"model.first_stage={a}", f"model.denoiser_pretrained={a}"], tiny=False).model,
                    None)


def _ldm_datamodule(compose_cfg, first_stage, data_dir):
    cfg = compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", f"paths.data_dir={data_dir}"], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    datamodule = build_datamodule(cfg, stage.downsample_factor)
    encode_latent_cache(stage.first_stage, datamodule, cfg.paths.latent_cache)
    return datamodule


def _overwrite_tensor_bytes(shard, value: float) -> None:
    """Finite garbage in every tensor of a safetensors file, its header intact."""
    raw = bytearray(shard.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    count = (len(raw) - start) // 4
    raw[start:start + 4 * count] = np.full(count, value, np.float32).tobytes()
    shard.write_bytes(bytes(raw))


def test_a_damaged_latent_cache_shard_is_detected_and_encoded_again(compose_cfg, tmp_path, caplog):
    first_stage = save_tiny_first_stage("vq", tmp_path / "vq")
    clean = _ldm_datamodule(compose_cfg, first_stage, tmp_path / "data")
    shard = next(clean.latent_cache.dir.glob("shard-*.safetensors"))
    assert stat.S_IMODE(shard.stat().st_mode) == FILE_MODE  # not mkstemp's 0600
    _overwrite_tensor_bytes(shard, 1e6)
    with caplog.at_level(logging.WARNING):
        again = _ldm_datamodule(compose_cfg, first_stage, tmp_path / "data")
    assert again.latent_scale == pytest.approx(clean.latent_scale, rel=1e-6)
    assert str(shard) in caplog.text and "checksum" in caplog.text
    assert (shard.parent / (shard.name + ".corrupt")).exists()

    # A shard truncated after the cache was opened: the error names it and the fix.
    again.setup("fit")
    new_shard = next(again.latent_cache.dir.glob("shard-*.safetensors"))
    new_shard.write_bytes(new_shard.read_bytes()[:100])
    dataset = again._dataset(train=False)
    with pytest.raises(LatentCacheError, match=f"{new_shard}.*task=cache_latents"):
        dataset[(0, *again.leftover_resolution, 0)]


def test_a_truncated_shard_is_set_aside_and_encoded_again(compose_cfg, tmp_path, caplog):
    first_stage = save_tiny_first_stage("kl", tmp_path / "kl")
    clean = _ldm_datamodule(compose_cfg, first_stage, tmp_path / "data")
    shard = next(clean.latent_cache.dir.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        again = _ldm_datamodule(compose_cfg, first_stage, tmp_path / "data")
    assert str(shard) in caplog.text
    assert again.latent_scale == pytest.approx(clean.latent_scale, rel=1e-6)


class PoisonWeights(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step == self.step:
            with torch.no_grad():
                pl_module.vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")


def test_non_finite_validation_stops_the_run_before_checkpoints_and_export(compose_cfg, tmp_path):
    cfg = compose_cfg(["max_steps=6", "val_every_n_steps=2", "model.ema_decay=null",
                       "+callbacks.poison={_target_: tests.test_reliability.PoisonWeights, step: 4}"])
    with pytest.raises(NonFiniteValidationError, match="step 4.*decoder.conv_out.weight"):
        train.run(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _step_of(checkpoints / "last.ckpt") == _step_of(checkpoints / "best.ckpt") == 2
    assert not (tmp_path / "run" / "export").exists()


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(compose_cfg, tmp_path):
    train.run(compose_cfg(SHORT))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    checkpoint["state_dict"]["vae.encoder.conv_in.weight"][0, 0, 0, 0] = float("inf")  # a flipped exponent bit
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    with pytest.raises(CheckpointError, match=f"{damaged}.*non-finite.*vae.encoder.conv_in.weight"):
        train.run(compose_cfg(["max_steps=4", f"ckpt_path={damaged}", f"paths.output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "b" / "checkpoints").exists()


def _png_header(width: int, height: int) -> bytes:
    """A valid greyscale PNG of the given size whose pixels were never written: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_symlinked_folders_are_followed_and_bad_links_and_huge_images_are_skipped(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "own").mkdir(parents=True)
    outside.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (i, 0, 0)).save(root / "own" / f"{i}.png")
        Image.new("RGB", (40, 32), (0, i, 0)).save(outside / f"{i}.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "own" / "back_to_root").symlink_to(root, target_is_directory=True)  # a loop
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    (root / "loop_a.png").symlink_to(root / "loop_b.png")
    (root / "loop_b.png").symlink_to(root / "loop_a.png")
    (root / "bomb.png").write_bytes(_png_header(20000, 10000))  # 200 M pixels: PIL refuses to open it

    index = index_folder(root, IMAGE_EXTENSIONS, cache_dir=None)
    names = sorted(os.path.relpath(p, root) for p in index.locations)
    assert names == ["bomb.png", *(f"linked/{i}.png" for i in range(3)), *(f"own/{i}.png" for i in range(3))]
    assert index.skipped == {"broken or looping link, or unreadable": 3}

    datamodule = ImageDataModule(FolderSource(root), resolution=32, batch_size=2, num_val=2, num_workers=0)
    datamodule.setup("fit")
    assert len(datamodule.index) == 6
    assert datamodule.index.skipped["too large (over data.max_image_pixels=89478485 pixels)"] == 1


# ------------------------------------------------------------------------------------------- unhelpful errors
@pytest.mark.parametrize("override,key", [("data.batch_size=0", "data.batch_size"),
                                          ("val_every_n_steps=0", "val_every_n_steps"),
                                          ("data.num_val=0", "data.num_val"),
                                          ("max_steps=-1", "max_steps")])
def test_impossible_counts_are_refused_naming_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        check_config(compose_cfg([override]))
    check_config(compose_cfg())  # the defaults pass


def test_a_number_as_a_config_group_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="precision=16.*bf16, bf16_4060ti, fp32"):
        check_group_choices(["precision=16"], CONF)
    check_group_choices(["precision=bf16", "model=vae,vqvae", "+data/buckets=novelai", "trainer.devices=2"], CONF)
    result = _run("precision=16", "--cfg", "job")
    assert result.returncode != 0 and "bf16, bf16_4060ti, fp32" in result.stderr and "Got int" not in result.stderr


def test_more_devices_than_the_machine_has_are_refused_before_any_process_starts(compose_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="trainer.devices=3, but this machine has no GPU"):
        check_config(compose_cfg(["trainer.accelerator=auto", "trainer.devices=3"]))
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):  # a GAN under plain DDP
        check_config(compose_cfg(["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]))
    check_config(compose_cfg(["trainer.accelerator=cpu", "trainer.devices=2",
                              "trainer.strategy=ddp_find_unused_parameters_true"]))
    # one device on each of two nodes is two DDP processes too (issue 21, item 4)
    with pytest.raises(ConfigError, match=r"2 processes \(trainer.devices=1 x trainer.num_nodes=2\).*unused_parameters"):
        check_config(compose_cfg(["trainer.num_nodes=2", "trainer.strategy=ddp"]))


@pytest.mark.parametrize("content,reason", [(b"", "is empty"), (b"\0" * 4096, "cannot be read")])
def test_an_empty_or_zeroed_checkpoint_is_named_with_the_fix(compose_cfg, tmp_path, content, reason):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{bad} {reason}.*best.ckpt"):
        train.run(compose_cfg([f"ckpt_path={bad}"]))


def test_a_checkpoint_of_another_model_says_what_it_holds(compose_cfg, tmp_path):
    vq = ["model=vqvae_tiny", "max_steps=1", "val_every_n_steps=1", f"paths.output_dir={tmp_path / 'vq'}"]
    train.run(compose_cfg(vq))
    with pytest.raises(CheckpointError, match="holds a VQ autoencoder.*this run trains a KL autoencoder"):
        train.run(compose_cfg([f"ckpt_path={tmp_path / 'vq' / 'checkpoints' / 'last.ckpt'}"]))


# ------------------------------------------------------------------------------------------- fidelity
def test_latent_scale_can_be_given_and_ldm_vq4_uses_the_seeds_one(compose_cfg, tmp_path):
    assert compose_cfg(["experiment=celebahq_ldm_vq4"], tiny=False).model.latent_scale == 1.0
    first_stage = save_tiny_first_stage("vq", tmp_path / "vq")
    cfg = compose_cfg([*LDM_TINY, f"model.first_stage={first_stage}", "model.latent_scale=1.0", "max_steps=1",
                       "val_every_n_steps=1", "sample.num_images=1"], tiny=False)
    train.run(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert float(checkpoint["state_dict"]["latent_scale"]) == 1.0
    measured = json.loads(next((tmp_path / "data" / "latents").glob("*/manifest-*.json")).read_text())
    assert measured["scaling_factor"] != pytest.approx(1.0)  # what would have been used


@pytest.mark.parity
def test_ddim_sampling_matches_ldms_ddim_sampler(compose_cfg, tmp_path):
    """Against samples of LDM's own DDIMSampler (tests/fixtures/make_ldm_ddim_reference.py says how they were made)."""
    from tests.fixtures.make_ldm_ddim_reference import eps_model

    reference = torch.load(ROOT / "tests" / "fixtures" / "ldm_ddim_reference.pt")
    cfg = compose_cfg([*LDM_TINY, f"model.first_stage={save_tiny_first_stage('vq', tmp_path / 'vq')}"], tiny=False)
    stage = build_stage(cfg.model, cfg.disc)
    for name, (ours, expected) in parity.ddim_outputs(stage.objective.sampling_scheduler).items():
        assert_parity(name, ours, expected)
    for steps, expected in reference["samples"].items():  # steps_offset 0, set_alpha_to_one: another sampler
        diffusers_default = denoise(eps_model, DDPM.sampler_scheduler(stage.objective.noise_scheduler.config, "ddim"),
                                    reference["x_T"], steps)
        assert parity.error(diffusers_default, expected) > 10 * parity.MARGIN * parity.MEASURED[f"ddim.{steps}"]


def test_optimizer_and_quantizer_defaults_are_the_originals(compose_cfg):
    """LDM's UNet: torch.optim.AdamW(params, lr) with PyTorch's default weight decay; LDM's vq-f4: taming's
    VectorQuantizer2(legacy=True)."""
    import inspect

    unet = compose_cfg(["model=unet"], tiny=False).model
    adamw_default = inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    assert unet.optimizer._target_ == "torch.optim.AdamW" and unet.optimizer.weight_decay == adamw_default
    assert compose_cfg(["model=vqvae"], tiny=False).model.legacy_beta is True
