"""Where images come from. A source prepares itself once, indexes its images (sizes from headers,
unusable files skipped by reason; a labelled source's classes and a captioned source's captions with them) and
opens one by its location."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_lab.core.errors import ConfigError, MissingPathError
from ldm_lab.data.captions import as_captions, metadata_captions, sidecar_captions
from ldm_lab.data.index import ImageIndex, index_folder, index_records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LABELS = (None, "subfolder")  # data.source.labels of a folder


class FolderSource:
    """Every jpg/jpeg/png/webp file under ``root`` (recursively, any case). ``labels="subfolder"``: the class
    of an image is the folder of the first level under ``root`` that holds it, as torchvision's ImageFolder
    has it: the folder names sorted as strings are the class ids 0..K-1 ("10" before "2"; hidden folders,
    whose name starts with a dot, are no class). An image directly in ``root`` has none and is skipped.

    Captions (ldm_lab/data/captions.py): ``caption_extension`` (e.g. ``.txt``) reads the file of that extension
    beside each image, one caption per line; ``caption_column`` reads that key of the ``metadata.jsonl`` files
    under ``root`` (🤗 Datasets' ImageFolder convention: ``{"file_name": ..., "text": ...}`` per line)."""

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, index_workers: int = 0,
                 labels: str | None = None, caption_extension: str | None = None, caption_column: str | None = None):
        if labels not in LABELS:
            raise ConfigError(f"data.source.labels={labels}: use subfolder (the class is the first folder level "
                              f"under data.source.root) or null (no classes)")
        if caption_extension is not None and caption_column is not None:
            raise ConfigError("data.source.caption_extension and data.source.caption_column both set: captions come "
                              "from files beside the images (caption_extension=.txt) or from metadata.jsonl "
                              "(caption_column=text); set the other to null")
        if caption_extension is not None and not caption_extension.startswith("."):
            raise ConfigError(f"data.source.caption_extension={caption_extension}: an extension with its dot, "
                              f"e.g. .txt")
        self.root = Path(root).expanduser()
        self.extensions = tuple(e.lower() for e in extensions)
        self.index_workers = index_workers
        self.labels = labels
        self.caption_extension = caption_extension
        self.caption_column = caption_column

    @property
    def name(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        """Called once, on one process, before ``index`` (the synthetic source writes its images here)."""

    def index(self, cache_dir: str | os.PathLike | None) -> ImageIndex:
        if not self.root.is_dir():
            raise MissingPathError(
                f"data.source.root={self.root} is not a folder. Point it at a folder of images: "
                f"python run.py data=folder data.source.root=/path/to/images"
            )
        index = index_folder(self.root, self.extensions, cache_dir, self.index_workers)
        if self.caption_extension is not None:
            index = index.captioned(*sidecar_captions(self.root.resolve(), index.locations, self.caption_extension,
                                                      cache_dir))
        elif self.caption_column is not None:
            index = index.captioned(*metadata_captions(self.root.resolve(), index.locations, self.caption_column))
        if self.labels == "subfolder":
            index = self._subfolder_labels(index)
        if not len(index):
            raise MissingPathError(f"no usable {'/'.join(self.extensions)} images under data.source.root={self.root}"
                                   f"\n{index.report(self.name)}")
        return index

    def _subfolder_labels(self, index: ImageIndex) -> ImageIndex:
        root = self.root.resolve()  # index_folder's locations lie under the resolved root
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        if not names:
            raise MissingPathError(f"data.source.labels=subfolder: data.source.root={self.root} has no subfolders, "
                                   f"one per class (<root>/<class name>/<image>); or set data.source.labels=null")
        ids = {name: i for i, name in enumerate(names)}
        parts = [Path(location).relative_to(root).parts for location in index.locations]
        labels = np.array([ids[p[0]] if len(p) > 1 and p[0] in ids else -1 for p in parts], dtype=np.int64)
        return index.labelled(labels, names, f"no class (not in a class subfolder of {self.root})")

    def open(self, location: str) -> Image.Image:
        return Image.open(location)


class HFSource:
    """An image column of a Hugging Face data set (``datasets``), from a hub id, or from a local copy:
    a ``save_to_disk`` folder, parquet files (a file, a glob, or a folder of them), or an ``imagefolder``.
    Sizes are read from the encoded bytes' headers, cached per data-set fingerprint. ``label_column``: the
    class of each image; its ``ClassLabel`` feature names the classes (other values: their sorted distinct
    strings do); a missing or out-of-range label skips the image. ``caption_column``: each image's caption, a
    string or a list of strings (several captions; an image with none keeps an empty one, counted)."""

    def __init__(self, path: str, split: str = "train", image_column: str = "image", name: str | None = None,
                 revision: str | None = None, label_column: str | None = None, caption_column: str | None = None):
        self.path = str(path)
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.config_name = name
        self.revision = revision
        self._dataset = None

    @property
    def name(self) -> str:
        return f"{self.path} [{self.split}]"

    def _load(self):
        import datasets

        local = Path(self.path).expanduser()
        try:
            if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
                loaded = datasets.load_from_disk(str(local))
                dataset = loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            elif self.path.endswith(".parquet") or (local.is_dir() and any(local.rglob("*.parquet"))):
                files = str(local / "**" / "*.parquet") if local.is_dir() else self.path
                dataset = datasets.load_dataset("parquet", data_files={self.split: files}, split=self.split)
            elif local.is_dir():
                dataset = datasets.load_dataset("imagefolder", data_dir=str(local), split=self.split)
            else:
                dataset = datasets.load_dataset(self.path, self.config_name, split=self.split, revision=self.revision)
        except Exception as error:  # network, hub, missing split: say how to use a local copy
            raise ConfigError(
                f"could not load the data set {self.path!r} (split {self.split!r}): {type(error).__name__}: {error}\n"
                f"Without network access, make a local copy where you have one, e.g. "
                f"`python -c \"import datasets; datasets.load_dataset('{self.path}', split='{self.split}')"
                f".save_to_disk('/path/to/copy')\"`, bring it here and set data.source.path=/path/to/copy "
                f"(a save_to_disk folder, parquet files or an image folder all work)."
            ) from error
        for key, column, none in (("image_column", self.image_column, ""),
                                  ("label_column", self.label_column, " (null: no classes)"),
                                  ("caption_column", self.caption_column, " (null: no captions)")):
            if column is not None and column not in dataset.column_names:
                raise ConfigError(f"{self.name} has no column {column!r} (columns: {dataset.column_names}); "
                                  f"set data.source.{key}{none}")
        return dataset.cast_column(self.image_column, datasets.Image(decode=False))

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def prepare(self) -> None:
        self.dataset  # downloads, once, on one process  # noqa: B018

    def index(self, cache_dir: str | os.PathLike | None) -> ImageIndex:
        index = index_records(self._encoded, len(self.dataset), f"hf-{self.dataset._fingerprint}", cache_dir)
        if self.caption_column is not None:
            rows = [int(location) for location in index.locations]
            values = self.dataset.select_columns([self.caption_column])[self.caption_column]
            read = [as_captions(values[row]) for row in rows]
            index = index.captioned([captions for captions, _ in read], Counter(n for _, notes in read for n in notes))
        if self.label_column is None:
            return index
        labels, names = self._labels()
        return index.labelled(labels[np.array(index.locations, dtype=np.int64)], names,
                              f"no class (an empty or unknown {self.label_column!r})")

    def _labels(self) -> tuple[np.ndarray, list[str]]:
        """Every row's class id (-1: none) and the class names."""
        import datasets

        values = self.dataset[self.label_column]
        feature = self.dataset.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            ids = [v if v is not None and 0 <= v < len(names) else -1 for v in values]
        else:
            names = sorted({str(v) for v in values if v is not None})
            position = {name: i for i, name in enumerate(names)}
            ids = [-1 if v is None else position[str(v)] for v in values]
        return np.array(ids, dtype=np.int64), names

    def _encoded(self, row: int) -> bytes | str:
        record = self.dataset[row][self.image_column]
        return record["bytes"] if record.get("bytes") is not None else record["path"]

    def open(self, location: str) -> Image.Image:
        encoded = self._encoded(int(location))
        return Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded)
