"""Hugging Face data sets through the same code as the hub path, on local copies the tests write."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from ldm_lab.core.errors import ConfigError
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.sources import HFSource

SIZES = [(40, 30), (30, 40), (36, 36), (48, 24), (32, 32), (44, 33)]


def _encoded(size, colour):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _dataset():
    rows = [{"bytes": _encoded(size, (i * 40, 90, 200)), "path": None} for i, size in enumerate(SIZES)]
    good = rows[0]["bytes"]
    rows.append({"bytes": good[: len(good) // 2], "path": None})  # truncated
    table = datasets.Dataset.from_dict({"image": rows, "label": list(range(len(rows)))})
    return table.cast_column("image", datasets.Image())


@pytest.fixture(params=["save_to_disk", "parquet"])
def local_copy(request, tmp_path):
    if request.param == "save_to_disk":
        _dataset().save_to_disk(str(tmp_path / "copy"))
        return str(tmp_path / "copy")
    (tmp_path / "pq").mkdir()
    _dataset().to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    return str(tmp_path / "pq")


def test_local_copy_is_indexed_with_sizes_and_skips(local_copy, tmp_path):
    source = HFSource(local_copy, split="train")
    source.prepare()
    index = source.index(tmp_path / "cache")
    assert list(zip(index.widths.tolist(), index.heights.tolist(), strict=True)) == SIZES
    assert dict(index.skipped) == {"corrupt or truncated": 1}
    with source.open(index.locations[3]) as image:
        assert image.size == (48, 24)
    again = HFSource(local_copy, split="train").index(tmp_path / "cache")  # from the cache
    assert again.locations == index.locations


def test_local_copy_trains_through_the_datamodule(local_copy):
    dm = ImageDataModule(HFSource(local_copy), resolution=16, batch_size=2, num_val=2, num_workers=0,
                         downsample_factor=8)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (2, 3, 16, 16)


def test_missing_column_names_the_key(local_copy):
    with pytest.raises(ConfigError, match="data.source.image_column"):
        HFSource(local_copy, image_column="img").prepare()


def test_unreachable_hub_data_set_says_how_to_use_a_local_copy(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = "from ldm_lab.data.sources import HFSource; HFSource('clane9/imagenet-100').prepare()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "clane9/imagenet-100" in result.stderr and "data.source.path=" in result.stderr


def test_validation_can_come_from_the_data_set_split(tmp_path):
    splits = datasets.DatasetDict({"train": _dataset(), "validation": _dataset().select(range(3))})
    splits.save_to_disk(str(tmp_path / "copy"))
    dm = ImageDataModule(HFSource(str(tmp_path / "copy"), split="train"), resolution=16, batch_size=2, num_val=2,
                         num_workers=0, downsample_factor=8,
                         val_source=HFSource(str(tmp_path / "copy"), split="validation"))
    dm.prepare_data()
    dm.setup("fit")
    assert (~dm.is_val).sum() == 6 and dm.is_val.sum() == 2  # all usable train rows; 2 of 3 validation rows
    val = [b["index"].tolist() for b in dm.val_dataloader()]
    assert all(i >= 6 for batch in val for i in batch)
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == 6
