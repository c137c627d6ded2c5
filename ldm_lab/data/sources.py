"""Where images come from. A source prepares itself once, indexes its images (sizes from headers,
unusable files skipped by reason) and opens one by its location."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ldm_lab.data.index import ImageIndex, index_folder

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
            raise FileNotFoundError(
                f"data.source.root={self.root} is not a folder. Point it at a folder of images: "
                f"python run.py data=folder data.source.root=/path/to/images"
            )
        index = index_folder(self.root, self.extensions, cache_dir, self.index_workers)
        if not len(index):
            raise FileNotFoundError(f"no usable {'/'.join(self.extensions)} images under data.source.root={self.root}"
                                    f"\n{index.report(self.name)}")
        return index

    def open(self, location: str) -> Image.Image:
        return Image.open(location)
