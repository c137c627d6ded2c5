"""Where images come from. A source prepares itself once, indexes its images (sizes from headers,
unusable files skipped by reason) and opens one by its location."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from ldm_lab.config.errors import ConfigError, MissingPathError
from ldm_lab.data.index import ImageIndex, index_folder, index_records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class FolderSource:
    """Every jpg/jpeg/png/webp file under ``root`` (recursively, any case)."""

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, index_workers: int = 0):
        self.root = Path(root).expanduser()
        self.extensions = tuple(e.lower() for e in extensions)
        self.index_workers = index_workers

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
        if not len(index):
            raise MissingPathError(f"no usable {'/'.join(self.extensions)} images under data.source.root={self.root}"
                                   f"\n{index.report(self.name)}")
        return index

    def open(self, location: str) -> Image.Image:
        return Image.open(location)


class HFSource:
    """An image column of a Hugging Face data set (``datasets``), from a hub id, or from a local copy:
    a ``save_to_disk`` folder, parquet files (a file, a glob, or a folder of them), or an ``imagefolder``.
    Sizes are read from the encoded bytes' headers, cached per data-set fingerprint."""

    def __init__(self, path: str, split: str = "train", image_column: str = "image", name: str | None = None,
                 revision: str | None = None):
        self.path = str(path)
        self.split = split
        self.image_column = image_column
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
        if self.image_column not in dataset.column_names:
            raise ConfigError(f"{self.name} has no column {self.image_column!r} (columns: {dataset.column_names}); "
                              f"set data.source.image_column")
        return dataset.cast_column(self.image_column, datasets.Image(decode=False))

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def prepare(self) -> None:
        self.dataset  # downloads, once, on one process  # noqa: B018

    def index(self, cache_dir: str | os.PathLike | None) -> ImageIndex:
        return index_records(self._encoded, len(self.dataset), f"hf-{self.dataset._fingerprint}", cache_dir)

    def _encoded(self, row: int) -> bytes | str:
        record = self.dataset[row][self.image_column]
        return record["bytes"] if record.get("bytes") is not None else record["path"]

    def open(self, location: str) -> Image.Image:
        encoded = self._encoded(int(location))
        return Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded)
