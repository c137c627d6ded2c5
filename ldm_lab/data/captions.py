"""Captions: the text beside each image, read once with the index, and the caption a training step sees.

Read from a sidecar file (``photo.jpg`` + ``photo.txt``, as kohya-ss/sd-scripts and SimpleTuner read them), a
``metadata.jsonl`` of 🤗 Datasets' ImageFolder (``file_name`` and a text column), or a Hugging Face column
(ldm_lab/data/sources.py). Each line of a caption file is one caption; an image with several gets one of them per
epoch, drawn from (seed, epoch, image). Nothing is dropped silently: an image without a caption keeps an empty one
(which trains the unconditional prediction), bytes that are no UTF-8 are decoded with replacement, a caption file
with no image is ignored, and each case is counted in the index's report.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ldm_lab.core.atomic import atomic_write_text
from ldm_lab.core.errors import ConfigError
from ldm_lab.data.index import scan_folder

NO_CAPTION = "no caption (trained with an empty one)"
EMPTY_CAPTION = "an empty caption"
UNDECODABLE = "a caption that is no UTF-8 (decoded with replacement)"
ORPHAN = "a caption file with no image (ignored)"
CACHE_VERSION = 1
CAPTION_STREAM = 2  # the caption's draw has its own random stream beside the crop and flip's

Captions = tuple[str, ...]  # one image's captions: at least one, possibly ""


def parse_captions(raw: bytes) -> tuple[Captions, list[str]]:
    """A caption file's captions (one per non-empty line, stripped) and what was wrong with it."""
    notes = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        notes.append(UNDECODABLE)
    captions = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not captions:
        notes.append(EMPTY_CAPTION)
    return captions or ("",), notes


def as_captions(value) -> tuple[Captions, list[str]]:
    """A column's or a metadata row's value (a string, a list of strings, or None) as captions and notes."""
    values = [value] if isinstance(value, str) or value is None else list(value)
    captions = tuple(str(v).strip() for v in values if v is not None and str(v).strip())
    if not captions:
        return ("",), [NO_CAPTION if value is None else EMPTY_CAPTION]
    return captions, []


def sidecar_captions(root: Path, image_paths: Sequence[str], caption_extension: str,
                     cache_dir: str | os.PathLike | None) -> tuple[list[Captions], Counter]:
    """The captions of ``image_paths`` (under ``root``) from the ``caption_extension`` file beside each; files
    are read again only when their size or mtime changed since ``cache_dir``'s record. The notes count images
    without a caption file, empty and undecodable files, and caption files beside no image of ``image_paths``."""
    paths, sizes, mtimes, _ = scan_folder(root, (caption_extension.lower(),))
    cache = Path(cache_dir) / f"captions-{_digest(root, caption_extension)}.json" if cache_dir else None
    saved = _read_cache(cache)
    entries, read = {}, 0
    for path, size, mtime in zip(paths, sizes.tolist(), mtimes.tolist(), strict=True):
        known = saved.get(path)
        if known is None or known[:2] != [size, mtime]:
            captions, notes = parse_captions(Path(path).read_bytes())
            known, read = [size, mtime, list(captions), notes], read + 1
        entries[path] = known
    if cache is not None and (read or entries.keys() != saved.keys()):
        atomic_write_text(cache, json.dumps({"version": CACHE_VERSION, "files": entries}))
    records = {path: (tuple(entry[2]), entry[3]) for path, entry in entries.items()}
    by_stem = {os.path.splitext(path)[0]: path for path in paths}
    captions, notes = [], Counter()
    for location in image_paths:
        path = by_stem.pop(os.path.splitext(location)[0], None)
        if path is None:
            captions.append(("",))
            notes[NO_CAPTION] += 1
            continue
        captions.append(records[path][0])
        notes.update(records[path][1])
    if by_stem:
        notes[ORPHAN] += len(by_stem)
    return captions, notes


def metadata_captions(root: Path, image_paths: Sequence[str], column: str) -> tuple[list[Captions], Counter]:
    """The captions of ``image_paths`` from every ``metadata.jsonl`` under ``root`` (🤗 Datasets' ImageFolder:
    one JSON object per line, ``file_name`` relative to the file's folder, the caption in ``column``)."""
    rows = {}
    files = sorted(root.rglob("metadata.jsonl"))
    if not files:
        raise ConfigError(f"data.source.caption_column={column}: no metadata.jsonl under {root}; write one "
                          f"({{\"file_name\": \"photo.jpg\", \"{column}\": \"a caption\"}} per line), or put each "
                          f"caption beside its image and set data.source.caption_extension=.txt")
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[os.path.normpath(file.parent.resolve() / row["file_name"])] = row.get(column)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConfigError(f"{file}:{number} is no JSON object with a file_name ({error}): fix that line "
                                  f"or remove it") from error
    captions, notes = [], Counter()
    for location in image_paths:
        found, found_notes = as_captions(rows.pop(os.path.normpath(location), None))
        captions.append(found)
        notes.update(found_notes)
    if rows:
        notes[ORPHAN] += len(rows)
    return captions, notes


class CaptionPicker:
    """``picker(index, epoch)``: the caption image ``index`` is served with. In training (``train``) one of its
    captions, drawn from (seed, epoch, image), and with ``shuffle_caption`` its comma-separated tags shuffled but
    the first ``keep_tokens`` (kohya's ``shuffle_caption`` / ``keep_tokens``); otherwise its first caption as
    written."""

    def __init__(self, captions: Sequence[Captions], seed: int, train: bool, shuffle_caption: bool = False,
                 keep_tokens: int = 0):
        if keep_tokens < 0:
            raise ConfigError(f"data.keep_tokens={keep_tokens}: the number of leading tags kept in place, 0 or more")
        self.captions = captions
        self.seed = seed
        self.train = train
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens

    def __call__(self, index: int, epoch: int) -> str:
        options = self.captions[index]
        if not self.train:
            return options[0]
        rng = np.random.default_rng([self.seed, epoch, index, CAPTION_STREAM])
        caption = options[int(rng.integers(len(options)))]
        if not self.shuffle_caption:
            return caption
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        return ", ".join(kept + [rest[i] for i in rng.permutation(len(rest))])


def _digest(root: Path, extension: str) -> str:
    return hashlib.sha1(f"{root}\0{extension}".encode()).hexdigest()[:16]


def _read_cache(cache: Path | None) -> dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        saved = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return saved["files"] if saved.get("version") == CACHE_VERSION else {}
