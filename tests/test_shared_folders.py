"""Jobs that share folders (issue 21, item 5): two processes started at once on one ``paths.data_dir`` (a
parallel sweep, a SLURM array) both finish, and what they share is there once: the synthetic set, the latent
cache's entries, a converted checkpoint."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import save_tiny_first_stage


def _together(target, *args) -> list[int]:
    """Run ``target(barrier, *args)`` in two fresh processes that start their work at one barrier; their exit codes."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=target, args=(barrier, *args)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    return [process.exitcode for process in processes]


def _prepare_synthetic(barrier, root: Path) -> None:
    from ldm_lab.data.synthetic import SyntheticSource

    source = SyntheticSource(root, num_images=64, min_side=32, max_side=64)
    barrier.wait()
    source.prepare()
    assert len(source.index(None)) == 64


def _encode(barrier, data_dir: Path, first_stage: Path, cache: Path) -> None:
    import torch

    from ldm_lab.data.datamodule import ImageDataModule
    from ldm_lab.data.synthetic import SyntheticSource
    from ldm_lab.io.model_sources import load_first_stage
    from ldm_lab.stages.encoding import encode_latent_cache

    torch.set_num_threads(1)
    datamodule = ImageDataModule(SyntheticSource(data_dir, num_images=24, min_side=32, max_side=48), resolution=32,
                                 batch_size=4, num_val=4, num_workers=0, downsample_factor=4)
    stage = load_first_stage(first_stage)
    encode = stage.moments
    encoded = []
    stage.moments = lambda pixels: encoded.append(len(pixels)) or encode(pixels)  # images this job encodes
    barrier.wait()
    encode_latent_cache(stage, datamodule, cache)
    (cache / f"encoded-by-{os.getpid()}").write_text(str(sum(encoded)))


@pytest.mark.parametrize("attempt", range(3))  # before the fix, 4 attempts of 5 failed: three leave it no chance
def test_two_jobs_drawing_the_synthetic_set_at_once_both_finish_with_one_set(tmp_path, attempt):
    assert _together(_prepare_synthetic, tmp_path / "synthetic") == [0, 0]
    sets = [p for p in (tmp_path / "synthetic").iterdir()]
    assert [p.name for p in sets] == ["seed0-n64-side32-64"]  # no side folder left behind
    assert len(list(sets[0].glob("*.*"))) == 64 + 1  # the images and the manifest


@pytest.mark.slow
def test_two_jobs_filling_one_latent_cache_encode_each_latent_once(tmp_path):
    first_stage = save_tiny_first_stage("kl", tmp_path / "kl")
    assert _together(_encode, tmp_path / "data", first_stage, tmp_path / "cache") == [0, 0]
    shards = list((tmp_path / "cache").rglob("shard-*.safetensors"))
    keys = [key for shard in shards for key in safe_open(shard, "pt").keys()]
    assert len(keys) == 24 and len(set(keys)) == 24  # every image once, in one job's shards
    assert len(list((tmp_path / "cache").rglob("manifest-*.json"))) == 1
    # the second job waited for the first and found every latent there (before: both encoded all 24)
    assert sorted(int(p.read_text()) for p in (tmp_path / "cache").glob("encoded-by-*")) == [0, 24]


def test_a_published_folder_has_the_permissions_mkdir_gives(tmp_path):
    from ldm_lab.core.atomic import FOLDER_MODE, publish_folder, side_folder

    built = side_folder(tmp_path / "set")
    (built / "done").write_text("")
    publish_folder(built, tmp_path / "set", lambda folder: (folder / "done").is_file())
    assert (tmp_path / "set").stat().st_mode & 0o777 == FOLDER_MODE  # mkdtemp alone gives 0700
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
