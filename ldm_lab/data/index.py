"""The image index: each image's id, width, height, location and (for a labelled source) class, the sizes
read from file headers without decoding pixels and cached on disk, so a second start on a large folder only
stats its files.

Files that cannot be used are skipped with a reason (empty, not an image, corrupt or truncated, a
broken or looping link) and counted; the report is printed at start. Symlinked folders are followed,
each real folder once. Sizes are as displayed: EXIF orientations that rotate by 90
degrees swap width and height.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ldm_lab.core.atomic import atomic_write
from ldm_lab.core.errors import ConfigError

log = logging.getLogger(__name__)

OK, EMPTY, NOT_IMAGE, CORRUPT = 0, 1, 2, 3
REASONS = {EMPTY: "empty file", NOT_IMAGE: "not an image", CORRUPT: "corrupt or truncated"}
UNREADABLE_LINK = "broken or looping link, or unreadable"
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # transposed or rotated by 90/270 degrees
CACHE_VERSION = 1


@dataclass
class ImageIndex:
    """Usable images (parallel arrays) and what was skipped, by reason; a labelled source's images also have
    a class id each (``labels``, into ``class_names``), a captioned source's their captions (``captions``: a
    tuple per image, ldm_lab/data/captions.py) with what was wrong with them counted (``caption_notes``)."""

    locations: list[str]
    widths: np.ndarray
    heights: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    captions: list[tuple[str, ...]] | None = None
    caption_notes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.locations)

    def select(self, keep: np.ndarray) -> ImageIndex:
        """The images where ``keep`` (a boolean mask or indices) is set; skipped counts, classes and caption notes
        stay."""
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep
        labels = None if self.labels is None else self.labels[keep]
        captions = None if self.captions is None else [self.captions[i] for i in keep]
        return ImageIndex([self.locations[i] for i in keep], self.widths[keep], self.heights[keep], self.skipped,
                          labels, self.class_names, captions, self.caption_notes)

    def captioned(self, captions: list[tuple[str, ...]], notes: Counter) -> ImageIndex:
        """This index with each image's captions and the count of what was wrong with them."""
        return dataclasses.replace(self, captions=list(captions), caption_notes=Counter(notes))

    def concatenated(self, other: ImageIndex) -> ImageIndex:
        """This index's images, then ``other``'s (a validation split), with this one's classes and counts."""
        if (self.captions is None) != (other.captions is None):
            raise ConfigError("the training and validation sources must both have captions or neither: set the "
                              "same caption key (data.source.* and data.val_source.*) on both")
        labels = None if self.labels is None else np.concatenate([self.labels, other.labels])
        captions = None if self.captions is None else self.captions + other.captions
        return ImageIndex(self.locations + other.locations, np.concatenate([self.widths, other.widths]),
                          np.concatenate([self.heights, other.heights]), self.skipped, labels, self.class_names,
                          captions, self.caption_notes + other.caption_notes)

    def labelled(self, labels: np.ndarray, class_names: list[str], reason: str) -> ImageIndex:
        """This index with a class id per image (``labels``, -1 where an image has none, or none this data
        knows): those images are skipped, counted under ``reason`` and named in a warning."""
        labels = np.asarray(labels, dtype=np.int64)
        unlabelled = labels < 0
        if unlabelled.any():
            names = [self.locations[i] for i in np.flatnonzero(unlabelled)[:5]]
            log.warning("%d images skipped, %s: %s%s", int(unlabelled.sum()), reason, ", ".join(names),
                        ", ..." if unlabelled.sum() > 5 else "")
        index = dataclasses.replace(self, skipped=self.skipped.copy(), labels=labels,
                                    class_names=list(class_names)).select(~unlabelled)
        if unlabelled.any():
            index.skipped[reason] += int(unlabelled.sum())
        return index

    def report(self, name: str) -> str:
        total = len(self) + sum(self.skipped.values())
        lines = [f"{name}: {len(self)} of {total} images usable"]
        lines += [f"  skipped {count:>8}  {reason}" for reason, count in self.skipped.most_common()]
        lines += [f"  caption {count:>8}  {note}" for note, count in self.caption_notes.most_common()]
        return "\n".join(lines)


@contextlib.contextmanager
def _no_pixel_limit():
    """PIL refuses to open images above ``Image.MAX_IMAGE_PIXELS`` (decompression bombs); reading a header
    decodes nothing, so the index reads every size and the datamodule skips what is too large."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def probe(source: str | os.PathLike | bytes) -> tuple[int, int, int]:
    """(width, height, status) of an image file or encoded bytes, from its header and structure:
    PNG chunks are checksummed, JPEG must end with its end-of-image marker; pixels are not decoded."""
    raw = isinstance(source, bytes)
    if (len(source) if raw else os.path.getsize(source)) == 0:
        return 0, 0, EMPTY
    with _no_pixel_limit():
        return _probe(source, raw)


def _probe(source: str | os.PathLike | bytes, raw: bool) -> tuple[int, int, int]:
    try:
        with Image.open(io.BytesIO(source) if raw else source) as image:
            width, height = image.size
            kind = image.format
            # A PNG's getexif() decodes every pixel to look for EXIF after the image data; an eXIf chunk
            # belongs before it (PNG spec), where opening the file has already read it into info.
            has_exif = kind != "PNG" or "exif" in image.info
            if has_exif and image.getexif().get(EXIF_ORIENTATION) in ROTATED_ORIENTATIONS:
                width, height = height, width
        if kind == "JPEG":  # PIL's verify checks nothing for JPEG; a complete one ends with EOI
            if not _ends_with_eoi(source):
                return width, height, CORRUPT
        else:
            with Image.open(io.BytesIO(source) if raw else source) as image:
                image.verify()  # PNG: every chunk's CRC, without decoding
    except UnidentifiedImageError:
        return 0, 0, NOT_IMAGE
    except (OSError, SyntaxError, ValueError, EOFError):
        return 0, 0, CORRUPT
    return width, height, OK


def _ends_with_eoi(source: str | os.PathLike | bytes) -> bool:
    if isinstance(source, bytes):
        return source.rstrip(b"\0").endswith(b"\xff\xd9")
    with open(source, "rb") as handle:
        handle.seek(max(0, os.path.getsize(source) - 64))
        return handle.read().rstrip(b"\0").endswith(b"\xff\xd9")


def _probe_many(paths: list[str], num_workers: int) -> list[tuple[int, int, int]]:
    if num_workers <= 1 or len(paths) < 2000:
        return [probe(p) for p in tqdm(paths, desc="indexing", unit="img", disable=len(paths) < 2000)]
    with ProcessPoolExecutor(num_workers) as pool:
        return list(tqdm(pool.map(probe, paths, chunksize=256), total=len(paths), desc="indexing", unit="img"))


def _save_atomically(cache: Path, **arrays: np.ndarray) -> None:
    """Write the cache atomically (DDP ranks index at the same time; a reader never sees half a file)."""
    atomic_write(cache, lambda file: np.savez(file, version=CACHE_VERSION, **arrays))


def _status_index(locations: list[str], widths, heights, status) -> ImageIndex:
    good = status == OK
    skipped = Counter({REASONS[code]: int((status == code).sum()) for code in REASONS if (status == code).any()})
    return ImageIndex([p for p, g in zip(locations, good, strict=True) if g], widths[good], heights[good], skipped)


def index_records(encoded, count: int, key: str, cache_dir: str | os.PathLike | None) -> ImageIndex:
    """Index ``count`` records whose encoded image (bytes or a path) ``encoded(row)`` gives; the locations
    are the row numbers. The result is cached under ``key`` (a data-set fingerprint: it changes with
    the data)."""
    cache = Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if int(saved["version"]) == CACHE_VERSION and len(saved["status"]) == count:
                return _status_index([str(i) for i in range(count)], saved["widths"], saved["heights"],
                                     saved["status"])
    probes = [probe(encoded(row)) for row in tqdm(range(count), desc="indexing", unit="img", disable=count < 2000)]
    widths, heights, status = (np.array(column, np.int64) for column in zip(*probes, strict=True))
    if cache is not None:
        _save_atomically(cache, widths=widths, heights=heights, status=status)
    return _status_index([str(i) for i in range(count)], widths, heights, status)


def scan_folder(root: Path, extensions: tuple[str, ...]) -> tuple[list[str], np.ndarray, np.ndarray, Counter]:
    """Every file under ``root`` with one of ``extensions`` (any case), following symlinked folders but
    walking each real folder once (a link back to an ancestor is no loop): sorted paths, sizes, mtimes
    (ns), and the count of files that cannot be read (broken or looping links)."""
    paths, sizes, mtimes, unreadable = [], [], [], Counter()
    walked = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        folder_stat = os.stat(folder)
        if (folder_stat.st_dev, folder_stat.st_ino) in walked:
            subfolders.clear()
            continue
        walked.add((folder_stat.st_dev, folder_stat.st_ino))
        subfolders.sort()  # the same folder is always reached by the same path
        for name in names:
            if name.lower().endswith(extensions):
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    unreadable[UNREADABLE_LINK] += 1
                    continue
                paths.append(path)
                sizes.append(stat.st_size)
                mtimes.append(stat.st_mtime_ns)
    order = np.argsort(paths, kind="stable")
    return ([paths[i] for i in order], np.array(sizes, np.int64)[order], np.array(mtimes, np.int64)[order],
            unreadable)


def index_folder(root: str | os.PathLike, extensions: tuple[str, ...], cache_dir: str | os.PathLike | None,
                 num_workers: int = 0) -> ImageIndex:
    """Index the images under ``root``, reusing ``cache_dir``'s record of every file whose path, size
    and mtime are unchanged; only new or changed files are probed."""
    root = Path(root).expanduser().resolve()
    paths, sizes, mtimes, unreadable = scan_folder(root, extensions)
    widths = np.zeros(len(paths), np.int64)
    heights = np.zeros(len(paths), np.int64)
    status = np.full(len(paths), -1, np.int64)
    cache = Path(cache_dir) / f"{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if int(saved["version"]) == CACHE_VERSION:
                position = {p: i for i, p in enumerate(saved["paths"].tolist())}
                for i, path in enumerate(paths):
                    j = position.get(path)
                    if j is not None and saved["sizes"][j] == sizes[i] and saved["mtimes"][j] == mtimes[i]:
                        widths[i], heights[i], status[i] = saved["widths"][j], saved["heights"][j], saved["status"][j]
    todo = np.flatnonzero(status < 0)
    if len(todo):
        log.info("indexing %d new or changed of %d files under %s", len(todo), len(paths), root)
        for i, (width, height, code) in zip(todo, _probe_many([paths[i] for i in todo], num_workers), strict=True):
            widths[i], heights[i], status[i] = width, height, code
        if cache is not None:
            _save_atomically(cache, paths=np.array(paths, dtype=str), sizes=sizes, mtimes=mtimes, widths=widths,
                             heights=heights, status=status)
    index = _status_index(paths, widths, heights, status)
    index.skipped.update(unreadable)
    return index
