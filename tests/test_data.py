"""The embedded synthetic set, the folder source and the datamodule, on files the tests write."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lab.data.datamodule import ImageDataModule, SeededShuffleSampler
from ldm_lab.data.sources import FolderSource
from ldm_lab.data.synthetic import SyntheticSource


def _digest(files):
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_synthetic_set_is_deterministic_and_varied(tmp_path):
    a = SyntheticSource(tmp_path / "a", num_images=9, seed=3, min_side=32, max_side=64)
    b = SyntheticSource(tmp_path / "b", num_images=9, seed=3, min_side=32, max_side=64)
    c = SyntheticSource(tmp_path / "c", num_images=9, seed=4, min_side=32, max_side=64)
    for source in (a, b, c):
        source.prepare()
    assert _digest(a.files()) == _digest(b.files())
    assert _digest(a.files()) != _digest(c.files())
    sizes = [Image.open(f).size for f in a.files()]
    assert len(set(sizes)) > 3 and any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert all(32 <= min(s) <= 64 for s in sizes)
    assert {f.suffix for f in a.files()} == {".png", ".jpg", ".webp"}


def test_synthetic_set_is_written_once(tmp_path):
    source = SyntheticSource(tmp_path, num_images=3, seed=0, min_side=32, max_side=40)
    source.prepare()
    mtimes = [f.stat().st_mtime_ns for f in source.files()]
    source.prepare()
    assert [f.stat().st_mtime_ns for f in source.files()] == mtimes


def test_folder_source_skips_and_counts_unreadable_files(tmp_path, caplog):
    good = tmp_path / "nested" / "deeper"
    good.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(good / "a.png")
    Image.new("L", (30, 40), 128).save(tmp_path / "b.jpg")
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(tmp_path / "c.webp")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    png = (good / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    files = FolderSource(tmp_path).files()
    assert sorted(f.name for f in files) == ["a.png", "b.jpg", "c.webp"]
    assert "skipped 3 unreadable of 6 image files" in caplog.text
    assert "empty file" in caplog.text and "not an image" in caplog.text and "corrupt" in caplog.text


def test_missing_folder_says_which_key_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.root="):
        FolderSource(tmp_path / "nowhere").files()


def test_datamodule_batches_are_square_rgb_in_range(tmp_path):
    source = SyntheticSource(tmp_path, num_images=10, seed=0, min_side=40, max_side=80)
    dm = ImageDataModule(source, resolution=32, batch_size=4, num_val=2, num_workers=0, downsample_factor=8)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))["pixel_values"]
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0 and batch.min() < -0.5 and batch.max() > 0.5
    assert not set(dm.train_set.files) & set(dm.val_set.files)


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = SeededShuffleSampler(50, seed=1), SeededShuffleSampler(50, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(SeededShuffleSampler(50, seed=2)) != first
    assert np.array_equal(list(a), list(a))
