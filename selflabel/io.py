"""File helpers: every file selflabel writes goes through a temp file and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import IO

import numpy as np


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``.

    An exception inside the block removes the temp file, so ``path`` is either
    the old file or the complete new one, never a partial write.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
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


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2)
