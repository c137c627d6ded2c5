"""Files that are either whole or absent: written to a temporary file in the destination's own folder,
flushed to disk, then renamed over the destination. A rename is atomic only within one file system,
so the temporary file never lives elsewhere (a temporary folder on another disk would make the
"rename" a copy, which a full disk leaves half-written, the previous file already gone)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are 0600


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, give it the usual
    permissions and rename it to ``path``. On any error the temporary file is removed and ``path``
    keeps what it held before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(partial, FILE_MODE)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
