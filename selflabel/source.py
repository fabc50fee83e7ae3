"""Row-block sources for the chunked backend: the score matrix is read in blocks of
rows, one streamed pass per iteration, never held whole in memory.

- ``NpyFileSource``: a ``.npy`` file (or a numpy memmap of one), read with
  ``os.preadv`` into two reusable buffers; a reader thread fills the next block
  while the current one is processed (double buffering).
- ``TensorSource``: an in-memory tensor or C-contiguous array (blocks are views, no copies).
- ``ArraySource``: any other numpy array or memmap (slices, flipped or strided views, mode
  'c' maps): each block is copied into a reusable buffer; for a memmap the pages of a
  block leave the process's resident set once copied, so the whole file never counts
  against the budget.
- ``CallableSource``: a user function returning the row blocks, one call per pass.

A memmap (or a slice of one) whose rows are one contiguous region of its file, with the
file's contents (mode 'r' or 'r+', or 'c' with nothing written to it), is read from the
file with ``NpyFileSource`` like a path.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch

_STORAGE = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32,
            np.dtype("float64"): torch.float64}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def check_float_dtype(dtype: torch.dtype | np.dtype | type, name: str = "scores") -> None:
    """Raise TypeError unless ``dtype`` (torch or numpy) is a floating-point type the solver reads."""
    if isinstance(dtype, torch.dtype):
        ok = dtype.is_floating_point
    else:
        dt = np.dtype(dtype)
        ok = dt.kind == "f" and dt.itemsize in (2, 4, 8)
    if not ok:
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64), got {dtype}; "
                        "cast it first, e.g. x.float() or x.astype(np.float32)")


def parse_bytes(budget: int | float | str) -> int:
    """Bytes from an int or a string such as "512MB", "1.5GiB"."""
    if isinstance(budget, bool):
        raise ValueError(f"memory_budget must be bytes or a string like '512MB', got {budget!r}")
    if isinstance(budget, (int, float)):
        value = int(budget)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget must be bytes or a string like '512MB' or '2GiB', got {budget!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return value


class RowSource:
    """Row blocks of (H, N, K) scores for the chunked backend: ``shape`` (H, N, K), ``ndim`` (as given),
    ``dtype``, ``itemsize`` and ``blocks(rows)``, and what the block size must allow for."""

    reader_thread = False  # blocks are read ahead by a thread of its own (on CPU it keeps a core)

    @property
    def storage_row_bytes(self) -> int:
        """Host bytes per row of a block that the source itself holds (two block buffers by default)."""
        h, _, k = self.shape
        return 2 * h * k * self.itemsize


class TensorSource(RowSource):
    def __init__(self, t: torch.Tensor) -> None:
        check_float_dtype(t.dtype)
        self.ndim = t.dim()
        self.t = t if t.dim() == 3 else t.unsqueeze(0)
        self.shape = tuple(self.t.shape)
        self.dtype = self.t.dtype
        self.itemsize = self.t.element_size()

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        n = self.shape[1]
        for lo in range(0, n, rows):
            yield lo, min(n, lo + rows), self.t[:, lo:lo + rows]


class NpyFileSource(RowSource):
    """Rows of an (N, K) or (H, N, K) C-ordered float16/32/64 ``.npy`` file."""

    reader_thread = True  # blocks are read ahead by a background thread

    def __init__(self, path: str, offset: int | None = None, shape: tuple | None = None,
                 dtype: np.dtype | None = None) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"scores: no such file {path!r}")
        if offset is None:
            with open(path, "rb") as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                except ValueError as exc:
                    raise ValueError(f"scores: {path!r} is not a valid .npy file ({exc})") from None
                offset = fh.tell()
            if fortran:
                raise ValueError(f"scores: {path!r} is Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
        dtype = np.dtype(dtype)
        if dtype not in _STORAGE:
            raise TypeError(f"scores: {path!r} holds {dtype}; the chunked backend reads float16, float32 or "
                            "float64 .npy files")
        if len(shape) not in (2, 3):
            raise ValueError(f"scores: {path!r} has shape {shape}; expected (N, K) or (H, N, K)")
        self.path, self.offset, self.np_dtype = path, offset, dtype
        self.ndim = len(shape)
        self.shape = tuple(shape) if len(shape) == 3 else (1, *shape)
        self.dtype = _STORAGE[dtype]
        self.itemsize = dtype.itemsize
        self._bufs: list[np.ndarray] | None = None  # the reader's two block buffers, kept across passes
        self._reader: threading.Thread | None = None  # the last read started
        need = offset + int(np.prod(self.shape)) * self.itemsize
        if os.path.getsize(path) < need:
            raise ValueError(f"scores: {path!r} is truncated ({os.path.getsize(path)} bytes, header says {need})")

    def drop_pages(self) -> bool:
        """Whether to evict each block from the page cache once read: for files over half of
        physical memory (caching them only evicts everything else), or when
        SELFLABEL_DROP_PAGE_CACHE=1 (benchmarks use it to measure cold reads)."""
        if os.environ.get("SELFLABEL_DROP_PAGE_CACHE") == "1":
            return True
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
        return os.path.getsize(self.path) > physical // 2

    def _read(self, fd: int, lo: int, hi: int, buf: np.ndarray) -> np.ndarray:
        h_count, n, k = self.shape
        out = buf[:, : hi - lo]
        for h in range(h_count):
            start = self.offset + (h * n + lo) * k * self.itemsize
            view = memoryview(out[h]).cast("B")
            got = 0
            while got < view.nbytes:  # preadv may return short reads
                r = os.preadv(fd, [view[got:]], start + got)
                if r <= 0:
                    raise OSError(f"unexpected end of {self.path!r}")
                got += r
            if self._drop:
                os.posix_fadvise(fd, start, view.nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        h_count, n, k = self.shape
        if self._reader is not None:  # a pass abandoned mid-way (an exception) may still be reading into _bufs
            self._reader.join()
        if self._bufs is None or self._bufs[0].shape[1] != rows:
            # kept for the next pass: fresh buffers would page-fault on every pass
            self._bufs = [np.empty((h_count, rows, k), dtype=self.np_dtype) for _ in range(2)]
        bufs = self._bufs
        self._drop = self.drop_pages()
        fd = os.open(self.path, os.O_RDONLY)
        reader = threading.Thread(target=lambda: None)
        reader.start()
        try:
            if self._drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            spans = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
            result: dict = {}

            def fetch(i: int) -> None:
                try:
                    result[i] = self._read(fd, *spans[i], bufs[i % 2])
                except BaseException as exc:  # re-raised in the consumer
                    result[i] = exc

            reader = self._reader = threading.Thread(target=fetch, args=(0,))
            reader.start()
            for i, (lo, hi) in enumerate(spans):
                reader.join()
                block = result.pop(i)
                if isinstance(block, BaseException):
                    raise block
                if i + 1 < len(spans):  # read the next block while this one is processed
                    reader = self._reader = threading.Thread(target=fetch, args=(i + 1,))
                    reader.start()
                yield lo, hi, torch.from_numpy(block)
        finally:
            reader.join()  # also when the consumer stops early: never close the fd under a read
            os.close(fd)


class CallableSource(RowSource):
    """Row blocks from a user function: ``scores()`` returns a fresh iterable of (rows, K) or
    (H, rows, K) blocks, in row order, each call (one call per pass). Shape and dtype are
    taken from a first pass. The blocks are the user's buffers; the budget covers ours."""

    def __init__(self, fn) -> None:
        self.fn = fn
        n, first = 0, None
        for block in fn():
            b = _as_block(block)
            if first is None:
                first, self.ndim = b, torch.as_tensor(block).dim()
            elif b.shape[0] != first.shape[0] or b.shape[2] != first.shape[2]:
                raise ValueError(f"scores(): blocks must share H and K; got {tuple(first.shape)} then {tuple(b.shape)}")
            n += b.shape[1]
        if first is None:
            raise ValueError("scores(): the chunk source yielded no blocks")
        if not first.dtype.is_floating_point:
            raise TypeError(f"scores(): blocks must be floating point, got {first.dtype}")
        self.shape = (first.shape[0], n, first.shape[2])
        self.dtype = first.dtype
        self.itemsize = first.element_size()

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        lo = 0
        for block in self.fn():
            b = _as_block(block)
            if lo + b.shape[1] > self.shape[1] or b.shape[0] != self.shape[0] or b.shape[2] != self.shape[2]:
                raise ValueError("scores(): the chunk source yielded different blocks on a later pass")
            yield lo, lo + b.shape[1], b
            lo += b.shape[1]
        if lo != self.shape[1]:
            raise ValueError(f"scores(): a later pass yielded {lo} rows, the first {self.shape[1]}")


def _as_block(block) -> torch.Tensor:
    t = torch.as_tensor(block)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"scores(): blocks must be (rows, K) or (H, rows, K), got shape {tuple(t.shape)}")
    return t


class ArraySource(RowSource):
    """Rows of any (N, K) or (H, N, K) float numpy array, one block copy at a time.

    For a memmap, ``release`` drops the pages of each copied block from the process's
    mapping (``MADV_DONTNEED``; the kernel keeps them in the page cache), so reading the
    whole file does not grow the resident set. That is only done where it cannot lose
    data: a shared mapping, or a private ('c') one that no page was written to.
    """

    def __init__(self, arr: np.ndarray, release: bool = False) -> None:
        check_float_dtype(arr.dtype)
        if arr.ndim not in (2, 3):
            raise ValueError(f"scores must have shape (N, K) or (H, N, K), got {arr.shape}")
        self.ndim = arr.ndim
        self.arr = arr if arr.ndim == 3 else arr[None]
        self.shape = tuple(self.arr.shape)
        self.np_dtype = np.dtype(arr.dtype)
        self.dtype = _STORAGE[self.np_dtype]
        self.itemsize = self.np_dtype.itemsize
        self._release = release
        self._buf: np.ndarray | None = None

    def _drop(self, view: np.ndarray) -> None:
        mm = view._mmap
        lo, hi = _byte_span(view)
        base = _mapping_address(mm)
        page = mmap.PAGESIZE
        # whole pages inside the span only: a page shared with the next block stays
        first = -(-(lo - base) // page) * page
        stop = min(len(mm), (hi - base) // page * page)
        if stop > first:
            mm.madvise(mmap.MADV_DONTNEED, first, stop - first)

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        h, n, k = self.shape
        if self._buf is None or self._buf.shape[1] != rows:
            self._buf = np.empty((h, rows, k), dtype=self.np_dtype)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            view = self.arr[:, lo:hi]
            out = self._buf[:, : hi - lo]
            np.copyto(out, view)
            if self._release:
                self._drop(view)
            yield lo, hi, torch.from_numpy(out)


def _mapping_address(mm: mmap.mmap) -> int:
    """Address of the first byte of a mapping."""
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        return view.ctypes.data
    finally:
        del view


def _byte_span(arr: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) addresses of the bytes an array view touches."""
    lo = hi = arr.ctypes.data
    for size, stride in zip(arr.shape, arr.strides, strict=True):
        if size == 0:
            return lo, lo
        reach = (size - 1) * stride
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + arr.itemsize


def _private_pages_written(mm: mmap.mmap) -> bool:
    """Whether a private ('c') mapping holds pages written since it was mapped (copy-on-write
    copies, which differ from the file). Unknown (no /proc): True."""
    try:
        with open("/proc/self/smaps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return True
    start = _mapping_address(mm)
    stop = start + len(mm)
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < stop and hi > start
        elif inside and head == "Anonymous:" and int(line.split()[1]) > 0:
            return True
    return False


def _memmap_source(mm: np.memmap):
    """The cheapest faithful source for a numpy memmap (or a slice of one)."""
    mapping = getattr(mm, "_mmap", None)
    if not isinstance(mapping, mmap.mmap) or mm.filename is None:
        return ArraySource(np.asarray(mm))
    written = mm.mode == "c" and _private_pages_written(mapping)
    if mm.flags.c_contiguous and not written and mm.ndim in (2, 3):
        # numpy maps the file from `offset` rounded down to the allocation granularity and copies
        # the parent's offset onto slices: the slice's own offset is its distance from the mapping
        start = mm.offset - mm.offset % mmap.ALLOCATIONGRANULARITY
        offset = start + mm.ctypes.data - _mapping_address(mapping)
        return NpyFileSource(mm.filename, offset, mm.shape, mm.dtype)
    return ArraySource(mm, release=not written)


def make_source(scores):
    """A row-block source for ``scores``; sources (e.g. ``selflabel.features.FeatureBlocks``) pass through."""
    if isinstance(scores, RowSource):
        return scores
    if isinstance(scores, (str, os.PathLike)):
        return NpyFileSource(os.fspath(scores))
    if isinstance(scores, np.memmap):
        check_float_dtype(scores.dtype)
        return _memmap_source(scores)
    if isinstance(scores, np.ndarray):
        check_float_dtype(scores.dtype)
        if not scores.flags.c_contiguous:
            return ArraySource(scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: never written
            return TensorSource(torch.from_numpy(scores))
    if isinstance(scores, torch.Tensor):
        if scores.dim() not in (2, 3):
            raise ValueError(f"scores must have shape (N, K) or (H, N, K), got {tuple(scores.shape)}")
        return TensorSource(scores)
    if callable(scores):
        return CallableSource(scores)
    raise TypeError(f"backend='chunked' reads a .npy path, numpy memmap/array, torch tensor or a function "
                    f"returning row blocks, got {type(scores).__name__}")
