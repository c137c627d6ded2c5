"""Captions from the data: sidecar files, metadata.jsonl, a Hugging Face column; what a batch carries."""

from __future__ import annotations

import json
import os
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm_lab.core.errors import ConfigError
from ldm_lab.data import captions as captions_module
from ldm_lab.data.captions import EMPTY_CAPTION, NO_CAPTION, ORPHAN, UNDECODABLE, CaptionPicker
from ldm_lab.data.datamodule import ImageDataModule
from ldm_lab.data.sources import FolderSource, HFSource
from ldm_lab.data.synthetic_captions import COLOURS, draw_captioned
from ldm_lab.tasks.trainer import build_datamodule

CAPTIONS = {  # image stem -> its caption file's bytes (None: no file)
    "a": b"a red square\nred, square, small\n",
    "b": b"  \n",
    "c": None,
    "d": b"caf\xe9 au lait",
    "e": b"one blue circle",
    "f": b"a green line",
}


def _write(root, captions=CAPTIONS, orphans=("lonely",)):
    root.mkdir(parents=True, exist_ok=True)
    for i, (stem, raw) in enumerate(captions.items()):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / f"{stem}.png")
        if raw is not None:
            (root / f"{stem}.txt").write_bytes(raw)
    for stem in orphans:
        (root / f"{stem}.txt").write_text("no image beside me")
    return root


def _by_name(index):
    return {os.path.basename(p): c for p, c in sorted(zip(index.locations, index.captions, strict=True))}


def _by_stem(index):
    return {os.path.splitext(os.path.basename(p))[0]: c for p, c in zip(index.locations, index.captions, strict=True)}


def test_sidecar_captions_are_read_and_what_is_wrong_is_counted(tmp_path):
    index = FolderSource(_write(tmp_path / "images"), caption_extension=".txt").index(tmp_path / "cache")
    assert len(index) == 6  # nothing dropped
    assert _by_stem(index) == {"a": ("a red square", "red, square, small"), "b": ("",), "c": ("",),
                               "d": ("caf\ufffd au lait",), "e": ("one blue circle",), "f": ("a green line",)}
    assert index.caption_notes == Counter({NO_CAPTION: 1, EMPTY_CAPTION: 1, UNDECODABLE: 1, ORPHAN: 1})
    report = index.report("images")
    assert f"caption        1  {NO_CAPTION}" in report and ORPHAN in report


def test_captions_are_cached_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    root = _write(tmp_path / "images")
    FolderSource(root, caption_extension=".txt").index(tmp_path / "cache")
    reads = []
    parse = captions_module.parse_captions
    monkeypatch.setattr(captions_module, "parse_captions", lambda raw: reads.append(raw) or parse(raw))
    again = FolderSource(root, caption_extension=".txt").index(tmp_path / "cache")
    assert reads == [] and _by_stem(again)["e"] == ("one blue circle",)
    (root / "e.txt").write_text("two blue circles, larger")
    os.utime(root / "e.txt", ns=(1, 1))  # a new mtime whatever the file system's resolution
    changed = FolderSource(root, caption_extension=".txt").index(tmp_path / "cache")
    assert reads == [b"two blue circles, larger"] and _by_stem(changed)["e"] == ("two blue circles, larger",)


def test_metadata_jsonl_captions_as_imagefolder_writes_them(tmp_path):
    root = _write(tmp_path / "images", {stem: None for stem in CAPTIONS}, orphans=())
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": ["one", "two"]},
            {"file_name": "c.png", "text": ""}, {"file_name": "gone.png", "text": "no such image"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    index = FolderSource(root, caption_column="text").index(None)
    assert {k: v for k, v in _by_stem(index).items() if k in "abc"} == {"a": ("a red square",), "b": ("one", "two"),
                                                                        "c": ("",)}
    assert index.caption_notes == Counter({NO_CAPTION: 3, EMPTY_CAPTION: 1, ORPHAN: 1})  # d, e, f have no row
    (root / "metadata.jsonl").unlink()
    with pytest.raises(ConfigError, match="no metadata.jsonl"):
        FolderSource(root, caption_column="text").index(None)
    with pytest.raises(ConfigError, match="caption_extension=.txt"):
        FolderSource(root, caption_extension=".txt", caption_column="text")


def test_hugging_face_caption_column_of_strings_or_lists(tmp_path):
    images = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(path)
        images.append(str(path))
    table = datasets.Dataset.from_dict({"image": images, "text": [["a", "b"], ["c"], [], ["d"]]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "copy"))
    index = HFSource(str(tmp_path / "copy"), caption_column="text").index(None)
    assert index.captions == [("a", "b"), ("c",), ("",), ("d",)]
    assert index.caption_notes == Counter({EMPTY_CAPTION: 1})
    with pytest.raises(ConfigError, match="data.source.caption_column"):
        HFSource(str(tmp_path / "copy"), caption_column="caption").prepare()


def test_a_caption_is_drawn_per_epoch_and_its_tags_shuffled_behind_the_kept_ones():
    captions = [("first", "second", "third"), ("red, square, small, bright, centred",)]
    train = CaptionPicker(captions, seed=0, train=True)
    drawn = [train(0, epoch) for epoch in range(30)]
    assert set(drawn) == {"first", "second", "third"} and drawn == [train(0, epoch) for epoch in range(30)]
    assert CaptionPicker(captions, seed=0, train=False)(0, 5) == "first"
    shuffled = CaptionPicker(captions, seed=0, train=True, shuffle_caption=True, keep_tokens=2)
    tags = [shuffled(1, epoch).split(", ") for epoch in range(20)]
    assert all(t[:2] == ["red", "square"] and sorted(t[2:]) == ["bright", "centred", "small"] for t in tags)
    assert len({tuple(t) for t in tags}) > 1
    with pytest.raises(ConfigError, match="data.keep_tokens"):
        CaptionPicker(captions, seed=0, train=True, keep_tokens=-1)


def test_batches_carry_their_images_captions(tmp_path):
    root = _write(tmp_path / "images")
    datamodule = ImageDataModule(FolderSource(root, caption_extension=".txt"), resolution=32, batch_size=2,
                                 num_val=2, num_workers=0, seed=1)
    datamodule.setup("fit")
    captions = datamodule.index.captions
    for loader, train in ((datamodule.train_dataloader(), True), (datamodule.val_dataloader(), False)):
        for batch in loader:
            assert len(batch["captions"]) == len(batch["index"]) == 2
            for caption, index in zip(batch["captions"], batch["index"].tolist(), strict=True):
                assert caption in captions[index] and (train or caption == captions[index][0])
    assert np.array_equal(datamodule.preview_images(2).shape, (2, 3, 32, 32))


def test_synthetic_captions_say_what_was_drawn_and_train_as_seen(compose_cfg, tmp_path):
    cfg = compose_cfg(["data.source.captions=true", "data.source.num_images=24", "data.resolution=32"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    root = datamodule.source.root
    drawn = [json.loads(line) for line in (root / "drawn.jsonl").read_text().splitlines()]
    assert len(drawn) == 24 and datamodule.index.caption_notes == Counter()
    for row, captions in zip(drawn, _by_name(datamodule.index).values(), strict=True):
        plural = "s" if row["count"] > 1 else ""
        words = f"{['one', 'two', 'three'][row['count'] - 1]} {row['colour']} {row['kind']}{plural}"
        assert captions[0] == f"{words} on a {row['background']} background" and len(captions) == 3
        assert row["colour"] != row["background"]
    assert {row["count"] for row in drawn} == {1, 2, 3} and len({row["kind"] for row in drawn}) == 3
    with Image.open(root / drawn[0]["file_name"]) as image:
        assert image.size == (32, 32)  # the training size: a random crop of it is the whole picture
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixel_values"].shape[-2:] == (32, 32) and len(batch["captions"]) == len(batch["index"])
    with pytest.raises(Exception, match="num_classes=null"):  # wrapped by Hydra's instantiate
        build_datamodule(compose_cfg(["data.source.captions=true", "data.source.num_classes=4"]))


def test_synthetic_shapes_are_whole_and_apart():
    for index in range(200):
        image, captions, drawn = draw_captioned(np.random.default_rng([0, index]), 32)
        pixels = np.asarray(image).reshape(-1, 3)
        shape = np.all(pixels == COLOURS[drawn["colour"]], axis=1).reshape(32, 32)
        assert not shape[0].any() and not shape[-1].any() and not shape[:, 0].any() and not shape[:, -1].any()
        assert ndimage.label(shape)[1] == drawn["count"]  # each shape one blob, none touching another
