"""Files and folders that are either whole or absent: written to a temporary file (folder) in the
destination's own folder, flushed to disk, then renamed over the destination. A rename is atomic only within
one file system, so the temporary file never lives elsewhere (a temporary folder on another disk would make
the "rename" a copy, which a full disk leaves half-written, the previous file already gone). Jobs sharing a
folder build what they share once: folders by a rename that tolerates a winner, cache entries under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are 0600
FOLDER_MODE = 0o777 & ~_umask()  # what mkdir would give: mkdtemp's folders are 0700


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


def side_folder(folder: Path) -> Path:
    """An empty folder beside ``folder``, this process's own, to build it in (:func:`publish_folder`), with the
    permissions mkdir gives (others on a shared cluster read what it becomes)."""
    built = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    os.chmod(built, FOLDER_MODE)
    return built


def publish_folder(built: Path, folder: Path, complete: Callable[[Path], bool]) -> None:
    """Rename the finished ``built`` (a :func:`side_folder`) to ``folder`` in one step. Jobs that share the
    parent (a parallel sweep, a SLURM array) may build the same folder at once: the first rename wins and the
    others, finding ``folder`` ``complete``, throw theirs away. An incomplete ``folder`` (a killed build) is
    replaced."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # the folder exists (another job's, or a stale one)
        os.rename(built, folder)
        return
    if complete(folder):
        shutil.rmtree(built, ignore_errors=True)
        return
    stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".stale"))
    os.replace(folder, stale / folder.name)
    os.rename(built, folder)
    shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (``flock`` on ``folder/.lock``): processes that would write the same entries of
    a shared cache take turns, and the later ones find them written."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
