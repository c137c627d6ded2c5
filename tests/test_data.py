"""The data layer on files the tests write: synthetic set, index, decoding, datamodule."""

from __future__ import annotations

import hashlib
import os

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lab.core.errors import ConfigError
from ldm_lab.data import index as index_module
from ldm_lab.data.datamodule import BucketConfig, ImageDataModule
from ldm_lab.data.images import to_rgb
from ldm_lab.data.index import index_folder
from ldm_lab.data.sources import IMAGE_EXTENSIONS, FolderSource
from ldm_lab.data.synthetic import SyntheticSource


def _digest(files):
    return [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]


def test_synthetic_set_is_deterministic_and_varied(tmp_path):
    sets = [SyntheticSource(tmp_path / name, num_images=9, seed=seed, min_side=32, max_side=64)
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    for source in sets:
        source.prepare()
    a, b, c = (source.index(None) for source in sets)
    assert _digest(a.locations) == _digest(b.locations) != _digest(c.locations)
    sizes = list(zip(a.widths.tolist(), a.heights.tolist(), strict=True))
    assert len(set(sizes)) > 3 and any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert all(32 <= min(s) <= 64 for s in sizes)
    assert {os.path.splitext(p)[1] for p in a.locations} == {".png", ".jpg", ".webp"}


def test_synthetic_set_is_written_once(tmp_path):
    source = SyntheticSource(tmp_path, num_images=3, seed=0, min_side=32, max_side=40)
    source.prepare()
    mtimes = [os.stat(p).st_mtime_ns for p in source.index(None).locations]
    source.prepare()
    assert [os.stat(p).st_mtime_ns for p in source.index(None).locations] == mtimes


def _write_zoo(root):
    """Valid images of every mode and orientation, and every kind of bad file."""
    nested = root / "nested" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(nested / "rgb.png")
    Image.new("L", (30, 40), 128).save(root / "grey.jpg")
    Image.new("LA", (32, 32), (10, 100)).save(root / "grey_alpha.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(root / "alpha.webp")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(root / "palette.png", transparency=0)
    Image.new("CMYK", (33, 33), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((34, 34), 40000, np.uint16)).save(root / "deep16.png")
    rotated = Image.new("RGB", (60, 20), "green")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90: displayed as 20 x 60
    rotated.save(root / "UPPER.JPG", exif=exif)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    png = (nested / "rgb.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = (root / "grey.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) - 40])
    (root / "notes.txt").write_text("not an image extension: not even looked at")


VALID = {"rgb.png", "grey.jpg", "grey_alpha.png", "alpha.webp", "palette.png", "cmyk.jpg", "deep16.png", "UPPER.JPG"}


def test_index_skips_every_bad_kind_with_its_reason_and_keeps_every_valid_image(tmp_path):
    _write_zoo(tmp_path)
    index = index_folder(tmp_path, IMAGE_EXTENSIONS, cache_dir=None)
    assert {os.path.basename(p) for p in index.locations} == VALID
    assert dict(index.skipped) == {"empty file": 1, "not an image": 1, "corrupt or truncated": 2}
    sizes = dict(zip((os.path.basename(p) for p in index.locations),
                     zip(index.widths.tolist(), index.heights.tolist(), strict=True), strict=True))
    assert sizes["UPPER.JPG"] == (20, 60)  # EXIF orientation respected
    assert sizes["rgb.png"] == (40, 30)
    assert "4 of 12 images usable" not in index.report("zoo") and "8 of 12 images usable" in index.report("zoo")


def test_every_mode_decodes_to_the_rgb_a_person_sees(tmp_path):
    _write_zoo(tmp_path)
    with Image.open(tmp_path / "alpha.webp") as image:
        assert to_rgb(image).getpixel((0, 0)) == pytest.approx((127, 127, 255), abs=2)  # blue at 50% on white
    with Image.open(tmp_path / "palette.png") as image:
        assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)  # the transparent colour is white
    with Image.open(tmp_path / "deep16.png") as image:
        assert to_rgb(image).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 of full scale
    with Image.open(tmp_path / "cmyk.jpg") as image:
        red = to_rgb(image).getpixel((0, 0))
        assert red[0] > 200 and red[1] < 60 and red[2] < 60
    with Image.open(tmp_path / "UPPER.JPG") as image:
        assert to_rgb(image).size == (20, 60)
    for name in VALID:
        with Image.open(next(tmp_path.rglob(name))) as image:
            assert to_rgb(image).mode == "RGB"


def test_index_is_reused_and_rebuilt_for_a_changed_file(tmp_path, monkeypatch):
    images, cache = tmp_path / "images", tmp_path / "cache"
    _write_zoo(images)
    probed = []
    real_probe = index_module.probe
    monkeypatch.setattr(index_module, "probe", lambda path: probed.append(os.path.basename(path)) or real_probe(path))
    first = index_folder(images, IMAGE_EXTENSIONS, cache)
    assert len(probed) == 12
    probed.clear()
    second = index_folder(images, IMAGE_EXTENSIONS, cache)
    assert probed == []
    assert second.locations == first.locations and second.skipped == first.skipped
    Image.new("RGB", (50, 70), "blue").save(images / "nested" / "deeper" / "rgb.png")  # changed
    (images / "empty.png").write_bytes((images / "grey.jpg").read_bytes())  # repaired
    third = index_folder(images, IMAGE_EXTENSIONS, cache)
    assert sorted(probed) == ["empty.png", "rgb.png"]
    sizes = dict(zip(third.locations, zip(third.widths.tolist(), third.heights.tolist(), strict=True), strict=True))
    assert sizes[str((images / "nested" / "deeper" / "rgb.png").resolve())] == (50, 70)
    assert "empty file" not in third.skipped and len(third) == 9


def test_missing_folder_says_which_key_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.root="):
        FolderSource(tmp_path / "nowhere").index(None)


def test_square_batches_are_rgb_in_range(tmp_path):
    source = SyntheticSource(tmp_path, num_images=10, seed=0, min_side=40, max_side=80)
    dm = ImageDataModule(source, resolution=32, batch_size=4, num_val=2, num_workers=0, downsample_factor=8)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["pixel_values"]
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0 and batch.min() < -0.5 and batch.max() > 0.5
    assert len(dm.val_dataloader()) == 1 and dm.is_val.sum() == 2


def test_bucketed_batches_hold_one_resolution_near_each_image_shape(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        wide = i % 2 == 0
        size = (int(rng.integers(120, 160)), int(rng.integers(60, 80)))
        Image.new("RGB", size if wide else size[::-1], tuple(int(c) for c in rng.integers(0, 255, 3))).save(
            root / f"{i}.png")
    Image.new("RGB", (400, 20)).save(root / "extreme.png")
    Image.new("RGB", (10, 12)).save(root / "tiny.png")
    buckets = BucketConfig(max_area=64 * 64, min_side=32, max_side=128, step=32, base_side=64, max_ar_error=0.6,
                           no_upscale=False)
    dm = ImageDataModule(FolderSource(root), buckets=buckets, batch_size=4, num_val=4, num_workers=0,
                         min_image_side=16, downsample_factor=8)
    dm.setup("fit")
    assert dict(dm.index.skipped) == {
        "too small (short side < 16 px or no bucket fits)": 1,
        "too extreme (aspect > 0.60 from every bucket, in log units)": 1,
    }
    shapes = set()
    for batch in dm.train_dataloader():
        shapes.add(tuple(batch["pixel_values"].shape[2:]))
    assert shapes <= set(dm.resolutions)  # every batch at one bucket resolution, (height, width) as torch's shape
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)  # tall and wide buckets both


def test_random_crops_and_flips_depend_on_seed_epoch_and_image_only(tmp_path):
    """The same epoch gives the same augmented pixels whatever the workers and the global RNG (so a resumed
    run replays them); the next epoch crops and flips anew."""
    source = SyntheticSource(tmp_path, num_images=10, seed=0, min_side=48, max_side=80)
    dm = ImageDataModule(source, resolution=32, batch_size=4, num_val=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")

    def epoch_pixels(epoch, num_workers, global_seed):
        torch.manual_seed(global_seed)
        dm.num_workers = num_workers
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        return {int(i): pixels for batch in loader
                for i, pixels in zip(batch["index"], batch["pixel_values"], strict=True)}

    first = epoch_pixels(0, num_workers=0, global_seed=1)
    again = epoch_pixels(0, num_workers=2, global_seed=2)
    assert first.keys() == again.keys() and all(torch.equal(first[i], again[i]) for i in first)
    later = epoch_pixels(1, num_workers=0, global_seed=1)
    common = first.keys() & later.keys()
    assert sum(not torch.equal(first[i], later[i]) for i in common) >= len(common) // 2


def test_a_trainer_draws_a_new_order_each_epoch(tmp_path):
    """Lightning sets the epoch on samplers, not on batch samplers: the bucket sampler must still get it."""

    class RecordOrder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            return self.weight * batch["pixel_values"].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    source = SyntheticSource(tmp_path, num_images=12, seed=0, min_side=32, max_side=40)
    dm = ImageDataModule(source, resolution=32, batch_size=4, num_val=4, num_workers=0)
    module = RecordOrder()
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False).fit(module, datamodule=dm)
    orders = list(module.seen.values())
    assert len(orders) == 3 and all(sorted(order) == sorted(orders[0]) for order in orders)
    assert len({tuple(order) for order in orders}) == 3


def test_resolution_must_divide_by_the_downsampling_factor(tmp_path):
    with pytest.raises(ValueError, match="data.resolution=24"):
        ImageDataModule(FolderSource(tmp_path), resolution=30, downsample_factor=8)


def test_validation_can_be_a_seeded_fraction(tmp_path):
    source = SyntheticSource(tmp_path, num_images=20, seed=0, min_side=40, max_side=80)
    dm = ImageDataModule(source, resolution=32, batch_size=2, num_val=0.25, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.is_val.sum() == 5 and len(dm.train_dataloader()) == 7


def test_ranks_indexing_at_once_do_not_trip_over_the_cache(tmp_path, monkeypatch):
    """DDP ranks write the index cache of the same folder at the same moment: here a second writer runs
    start to finish between the first one's write and its rename."""
    images, cache = tmp_path / "images", tmp_path / "cache"
    _write_zoo(images)
    real_replace = os.replace
    interleaved = []

    def replace_after_a_rival(source, target):
        if not interleaved:
            interleaved.append(True)
            index_folder(images, IMAGE_EXTENSIONS, cache)  # the other rank
        real_replace(source, target)

    monkeypatch.setattr(index_module.os, "replace", replace_after_a_rival)
    first = index_folder(images, IMAGE_EXTENSIONS, cache)
    assert interleaved and len(first) == len(VALID)
    assert not list(cache.glob("*.tmp.npz"))
    assert index_folder(images, IMAGE_EXTENSIONS, cache).locations == first.locations


def test_a_partial_bucket_set_names_the_missing_keys(tmp_path):
    """The bucket values live in conf/data/buckets/ only: a set lacking some says which and where to start."""
    partial = {"max_area": 64 * 64, "min_side": 32, "max_side": 128, "step": 32, "base_side": 64}
    with pytest.raises(ConfigError, match=r"data.buckets lacks max_ar_error, no_upscale: .*\+data/buckets=novelai"):
        ImageDataModule(FolderSource(tmp_path), buckets=partial)
