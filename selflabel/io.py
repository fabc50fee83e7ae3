"""File helpers: every file selflabel writes goes through a temp file and a rename.

``temp_file`` is the one place that creates those temp files: next to the target, with the
permissions of an ordinary new file (``0o666 & ~umask``; ``mkstemp`` alone makes them 0600).
``atomic_write`` (labels, checkpoints, JSON) and ``ScoreStore`` both use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import IO

import numpy as np


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``).

    ``os.umask`` can only be read by setting it; in between, a file created by another thread
    (a data-loader or TensorBoard writer thread) would get the wrong mode, so that is the fallback.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a hidden temp file next to ``path`` (same file system, so it can be renamed over it).

    Returns ``(fd, temp_path)``; the file has ordinary new-file permissions, ``0o666 & ~umask``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``.

    An exception inside the block removes the temp file, so ``path`` is either
    the old file or the complete new one, never a partial write. The new file has
    mode ``0o666 & ~umask``, as if created by ``open``.
    """
    path = os.fspath(path)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended), atomically."""
    fh: IO[bytes]
    with atomic_write(path) as fh:
        np.save(fh, array, allow_pickle=False)


def save_text(path: str | os.PathLike, array: np.ndarray, delimiter: str = " ") -> None:
    """Integers as text, atomically: one line per row of ``array`` (a 1-D array: one value per line)."""
    with atomic_write(path, "w") as fh:
        np.savetxt(fh, np.asarray(array), fmt="%d", delimiter=delimiter)


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2)
