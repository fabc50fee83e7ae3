"""ScoreStore: write model outputs to an on-disk ``.npy`` block by block, so scores
for millions of samples are aggregated without the N x K matrix in memory."""

from __future__ import annotations

import os

import numpy as np
import torch

from .io import temp_file


class ScoreStore:
    """Append row blocks of an (N, K) or (heads, N, K) score matrix to ``path``.

    The data go to a hidden temp file next to ``path``; ``close()`` checks that all N
    rows were written, fsyncs and renames it over ``path``. Leaving the ``with`` block
    with an exception (or a crash) never produces ``path``: an interrupted write
    leaves no file that looks complete.

        with ScoreStore("scores.npy", n=len(dataset), k=3000, dtype=np.float16) as store:
            for x, _ in loader:
                store.append(model(x).softmax(1))
    """

    def __init__(self, path: str | os.PathLike, n: int, k: int, *, heads: int | None = None,
                 dtype: np.dtype | type = np.float32) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("float16"), np.dtype("float32"), np.dtype("float64")):
            raise TypeError(f"dtype must be float16, float32 or float64, got {self.dtype}")
        if n < 1 or k < 1 or (heads is not None and heads < 1):
            raise ValueError(f"n, k (and heads) must be positive, got n={n}, k={k}, heads={heads}")
        self.path = os.fspath(path)
        self.n, self.k, self.heads = n, k, heads
        self.shape = (n, k) if heads is None else (heads, n, k)
        self.written = 0
        fd, self.tmp = temp_file(self.path, suffix=".partial")  # mode 0o666 & ~umask, like the labels
        self._fh = os.fdopen(fd, "wb")
        try:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_2_0(self._fh, header)
            self._fh.flush()
            self._offset = self._fh.tell()
        except BaseException:
            self.abort()
            raise

    def append(self, block) -> None:
        """Write the next rows: (rows, K), or (heads, rows, K) for a multi-head store."""
        arr = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
        arr = arr if self.heads is not None else arr[None]
        if arr.ndim != 3 or arr.shape[0] != (self.heads or 1) or arr.shape[2] != self.k:
            want = f"(rows, {self.k})" if self.heads is None else f"({self.heads}, rows, {self.k})"
            raise ValueError(f"block must have shape {want}, got {tuple(block.shape)}")
        rows = arr.shape[1]
        if self.written + rows > self.n:
            raise ValueError(f"store holds {self.n} rows; this block would make {self.written + rows}")
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        fd = self._fh.fileno()
        for h in range(arr.shape[0]):
            view = memoryview(arr[h]).cast("B")
            start = self._offset + (h * self.n + self.written) * self.k * self.dtype.itemsize
            done = 0
            while done < view.nbytes:  # pwrite may write less than asked (e.g. > 2 GiB on Linux)
                done += os.pwrite(fd, view[done:], start + done)
        self.written += rows

    def close(self) -> None:
        """Finalise: all rows present, data on disk, then the atomic rename."""
        if self._fh.closed:
            return
        if self.written != self.n:
            self.abort()
            raise ValueError(f"store was given {self.written} of {self.n} rows; {self.path} was not written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> ScoreStore:
        return self

    def __del__(self) -> None:  # a store dropped without close() leaves no temp file behind
        if hasattr(self, "_fh"):
            self.abort()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
