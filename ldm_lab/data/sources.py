"""Where images come from: a list of image files, with the unreadable ones skipped and counted."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class FolderSource:
    """Every jpg/jpeg/png/webp file under ``root`` (recursively), in sorted order."""

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        self.root = Path(root).expanduser()
        self.extensions = tuple(e.lower() for e in extensions)

    def prepare(self) -> None:
        """Called once, on one process, before ``files`` (the synthetic source writes its images here)."""

    def files(self) -> list[Path]:
        """The readable image files; unreadable ones are logged with their reason and left out."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.source.root={self.root} is not a folder. Point it at a folder of images: "
                f"python run.py data=folder data.source.root=/path/to/images"
            )
        candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in self.extensions and p.is_file())
        readable, skipped = [], Counter()
        for path in candidates:
            reason = unreadable_reason(path)
            if reason is None:
                readable.append(path)
            else:
                skipped[reason] += 1
                log.debug("skipping %s: %s", path, reason)
        if skipped:
            log.warning("%s: skipped %d unreadable of %d image files (%s)", self.root, sum(skipped.values()),
                        len(candidates), ", ".join(f"{n} {r}" for r, n in skipped.most_common()))
        if not readable:
            raise FileNotFoundError(
                f"no readable {'/'.join(self.extensions)} images under data.source.root={self.root}"
            )
        return readable


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (checked from its header and structure), or None."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt ({type(error).__name__})"
    return None
