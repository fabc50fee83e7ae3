"""Chunked (out-of-core) backend: the score matrix is streamed in row blocks, one
pass over the source per iteration, within a memory budget.

The first pass computes the row shift (row max) of every row with the fused
``prepare``. Later passes hand the C++ kernels the raw score block with its shift
(a ``ScoreBlock``): each kernel row (shift, scale, exp) is recomputed into a
per-thread scratch row inside the same fused iteration as the in-memory solver, so
per entry a pass costs one read and one exp and writes nothing. The column sums of
the blocks are added up (log-sum-exp in the log domain). File sources are read by a
background thread into two reusable buffers while the previous block computes.

On a CUDA device (``sinkhorn_knopp(..., device="cuda")``) the passes are the Triton
kernels and ``DeviceFeed`` moves each host block over PCIe: two pinned staging
buffers, a copy stream and two device buffers, so the transfer of block i+1 runs
while the kernels work on block i (double buffering). The N-long vectors stay on
the device; only row blocks travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..source import RowSource, TensorSource
from . import Backend, BackendBase, Prepared, ScoreBlock, resolve_device

FIXED_OVERHEAD = 64 * 2**20  # allocator slack and small buffers, kept out of the block budget
# On CPU a block holds at most this many bytes of scores, whatever the budget: the block the
# reader thread copied is then still in the last-level cache when the kernels read it, which
# saves a trip to memory per entry (bench_ooc, 2M x 1000 on 2 cores: 1.5 s/pass at 8 MiB blocks,
# 2.5 s at 168 MiB; smaller blocks pay more per-block overhead).
CPU_BLOCK_BYTES = 8 * 2**20
# On CUDA a block holds at most this many bytes: large enough for full PCIe speed and cheap
# launches, small enough that the two pinned host staging buffers (outside the GPU budget)
# stay modest when the budget is most of a large GPU.
CUDA_BLOCK_BYTES = 256 * 2**20


def cap_block_rows(rows: int, shape: tuple[int, int, int], itemsize: int, device: torch.device) -> int:
    """``rows`` (what the budget allows) capped to the block size that suits ``device``."""
    h, _, k = shape
    cap = CPU_BLOCK_BYTES if device.type == "cpu" else CUDA_BLOCK_BYTES
    return min(rows, max(1, cap // (h * k * itemsize)))


@dataclass
class ChunkedScores:
    """What the front hands this backend instead of a tensor."""

    source: RowSource
    compute_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.source.shape


@dataclass
class Streamed:
    """The kernel matrix of a source, recomputed block by block."""

    source: RowSource
    rows: int
    lamb: float
    probs: bool
    exponentiate: bool
    dtype: torch.dtype
    feed: DeviceFeed
    advance: Callable[[float], None] | None = None  # told the fraction of a pass each block is
    shift: torch.Tensor | None = None  # (H, N) row max, known after the first pass
    _cast: torch.Tensor | None = field(default=None, repr=False)  # reused dtype-conversion buffer

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.source.shape

    @property
    def device(self) -> torch.device:
        return self.feed.device

    def blocks(self):
        """(lo, hi, scores (H, hi - lo, K)) in the compute dtype, contiguous, on the device; one pass."""
        n = self.shape[1]
        for lo, hi, block in self.feed(self.source.blocks(self.rows), isinstance(self.source, TensorSource)):
            yield lo, hi, self._in_compute_dtype(block)
            if self.advance is not None:
                self.advance((hi - lo) / n)

    def kernel_blocks(self, inner: Backend):
        """(lo, hi, kernel rows of the block) for ``inner``'s passes: a ScoreBlock where the
        backend recomputes rows itself (C++), else the block's kernel matrix from its prepare."""
        lazy = self.shift is not None and inner.recomputes_rows
        for lo, hi, block in self.blocks():
            if lazy:
                yield lo, hi, ScoreBlock(block, self.shift[:, lo:hi].contiguous(), self.lamb, self.probs)
            else:
                yield lo, hi, inner.prepare(block, self.lamb, self.probs, self.exponentiate).mat

    def _in_compute_dtype(self, block: torch.Tensor) -> torch.Tensor:
        if block.dtype == self.dtype and block.is_contiguous():
            return block
        h, r, k = block.shape  # r <= self.rows: the feed splits longer blocks
        if self._cast is None:  # one buffer for all passes: a fresh one per block would page-fault each time
            self._cast = torch.empty(h * self.rows * k, dtype=self.dtype, device=block.device)
        return self._cast[: h * r * k].view(h, r, k).copy_(block)


class DeviceFeed:
    """Moves the row blocks of a host source to ``device``, one pass at a time.

    CUDA: block i is copied (on the calling thread) into pinned staging buffer i % 2,
    then sent by a side stream into device buffer i % 2 with a non-blocking copy; the
    compute stream waits for that copy only, and the copy of block i+2 into the same
    buffers waits for the kernels that read block i. So while the GPU computes block i,
    the host stages block i+1 and the copy engine moves it. Blocks of a pinned source
    tensor skip the staging copy (one copy per head); blocks already on the device pass
    through. On every device blocks longer than ``rows`` (a chunk function's) are split,
    so no block outgrows the buffers sized by the budget.
    CPU: blocks are moved to the CPU if needed and otherwise pass through.
    """

    def __init__(self, device: torch.device, shape: tuple[int, int, int], rows: int, dtype: torch.dtype) -> None:
        self.device, self.rows, self.dtype = device, rows, dtype
        h, _, k = shape
        self._hk = (h, k)
        self._host: list[torch.Tensor | None] = [None, None]  # allocated on first use
        self._dev: list[torch.Tensor | None] = [None, None]
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._consumed = [torch.cuda.Event() for _ in range(2)]

    def _buffer(self, which: list, slot: int, rows: int, **where) -> torch.Tensor:
        """The first ``rows`` rows of a (H, self.rows, K) buffer, as a contiguous (H, rows, K) view."""
        h, k = self._hk
        if which[slot] is None:
            which[slot] = torch.empty(h * self.rows * k, dtype=self.dtype, **where)
        return which[slot][: h * rows * k].view(h, rows, k)

    def _split(self, blocks):
        for lo, hi, block in blocks:
            for start in range(0, hi - lo, self.rows):
                stop = min(hi - lo, start + self.rows)
                yield lo + start, lo + stop, block[:, start:stop]  # a view: pinned and device stay as they were

    def __call__(self, blocks, stable: bool):
        """``stable``: the source's blocks stay valid after the next one is drawn (a tensor source),
        so a pinned one may be copied asynchronously without staging."""
        if self.device.type != "cuda":
            for lo, hi, block in self._split(blocks):
                yield lo, hi, block.to(self.device)
            return
        compute = torch.cuda.current_stream(self.device)
        for i, (lo, hi, block) in enumerate(self._split(blocks)):
            if block.device == self.device:
                yield lo, hi, block
                continue
            slot, r = i % 2, hi - lo
            block = block.to(self.dtype)
            direct = stable and block.is_pinned() and all(block[j].is_contiguous() for j in range(block.shape[0]))
            if not direct:
                self._copied[slot].synchronize()  # the copy that last read this staging buffer is done
                staged = self._buffer(self._host, slot, r, pin_memory=True)
                staged.copy_(block)
                block = staged
            dst = self._buffer(self._dev, slot, r, device=self.device)
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._consumed[slot])  # kernels on block i-2 are done with dst
                for j in range(block.shape[0]):  # per head: each slice is contiguous
                    dst[j].copy_(block[j], non_blocking=True)
                self._copied[slot].record(self._copy_stream)
            compute.wait_event(self._copied[slot])
            try:
                yield lo, hi, dst
            finally:  # also when the pass stops early: the next pass must not overwrite dst under a kernel
                self._consumed[slot].record(compute)


def _costs(source, dtype: torch.dtype) -> tuple[int, int]:
    """(fixed bytes, bytes per row of a block), on the device that computes.

    Per row: two storage buffers (double buffering: the file reader's on CPU, the
    device buffers on CUDA), the block in the compute dtype, the kernel rows, and a few
    per-row outputs. Fixed: about 12 N-long float64 vectors per head (duals, row max,
    row sums, labels, ...), the column vectors and slack. On CUDA the two pinned host
    staging buffers are host memory, outside the device budget.
    """
    h, n, k = source.shape
    item = torch.tensor([], dtype=dtype).element_size()
    storage = source.storage_row_bytes
    per_row = storage + 2 * h * k * item + h * 8 * 4
    fixed = FIXED_OVERHEAD + h * n * 8 * 12 + h * k * 8 * 16
    return fixed, per_row


def rows_for_budget(source, dtype: torch.dtype, budget: int) -> int:
    """Rows per block so that every buffer the solver allocates fits ``budget`` bytes."""
    fixed, per_row = _costs(source, dtype)
    rows = (budget - fixed) // per_row
    if rows < 1:
        need = fixed + per_row
        h, _, k = source.shape
        raise ValueError(f"memory_budget={budget} bytes is too small for one row of {h}x{k} scores plus the "
                         f"solver's vectors; give at least {need} bytes ({need / 2**20:.0f} MiB)")
    return int(min(rows, source.shape[1]))


def budget_for_rows(source, dtype: torch.dtype, rows: int) -> int:
    """The smallest budget that gives blocks of ``rows`` rows."""
    fixed, per_row = _costs(source, dtype)
    return fixed + rows * per_row


class ChunkedBackend(BackendBase):
    name = "chunked"

    def __init__(self, rows: int, device: torch.device | str, inner: Backend) -> None:
        """``rows`` per block (``rows_for_budget`` capped by ``cap_block_rows``), passes run by ``inner``."""
        self.device = resolve_device(device)
        self.inner = inner  # runs the passes over each block (``selflabel.select.for_blocks``)
        self.rows = rows
        self._feed: DeviceFeed | None = None

    def prepare(self, source: ChunkedScores, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        h, n, k = source.shape
        dtype, dev = source.compute_dtype, self.device
        if self._feed is None:  # one set of transfer buffers for every pass of this solve
            self._feed = DeviceFeed(dev, source.shape, self.rows, source.source.dtype)
        mat = Streamed(source.source, self.rows, lamb, probs, exponentiate, dtype, self._feed, self._advance)
        rowmax = torch.empty(h, n, dtype=dtype, device=dev)
        rowsum = torch.empty(h, n, dtype=torch.float64, device=dev)
        rowmin = torch.empty(h, n, dtype=torch.float64, device=dev)
        colmax = torch.full((h, k), float("-inf"), dtype=dtype, device=dev)
        for lo, hi, block in mat.blocks():
            p = self.inner.prepare(block, lamb, probs, exponentiate=False)
            rowmax[:, lo:hi], rowsum[:, lo:hi], rowmin[:, lo:hi] = p.rowmax, p.rowsum, p.rowmin
            torch.maximum(colmax, p.colmax, out=colmax)
        mat.shift = rowmax
        return Prepared(mat, rowmax, colmax, rowsum, rowmin)

    def _advance(self, fraction: float) -> None:
        if self.advance is not None:
            self.advance(fraction)

    def log_view(self, prep: Prepared, scores: ChunkedScores, lamb: float, probs: bool) -> Streamed:
        """The log kernel of ``prep`` (already a recomputed stream): the same stream, read as logs."""
        return replace(prep.mat, exponentiate=False)

    # Column sums are combined across blocks in float64, as the kernel does within a block.
    def scaling_pass(self, mat: Streamed, a, u, v, omega=1.0):
        w = torch.zeros(v.shape, dtype=torch.float64, device=self.device)
        change = torch.zeros(u.shape[0], dtype=torch.float64, device=self.device)
        for lo, hi, kb in mat.kernel_blocks(self.inner):
            ub = u[:, lo:hi].contiguous()
            wb, cb = self.inner.scaling_pass(kb, a[lo:hi].contiguous(), ub, v, omega)
            u[:, lo:hi] = ub
            w += wb
            change += cb
        return w.to(v.dtype), change

    def log_pass(self, mat: Streamed, log_a, f, g, omega=1.0):
        logw = torch.full(g.shape, float("-inf"), dtype=torch.float64, device=self.device)
        change = torch.zeros(f.shape[0], dtype=torch.float64, device=self.device)
        for lo, hi, kb in mat.kernel_blocks(self.inner):
            fb = f[:, lo:hi].contiguous()
            lw, cb = self.inner.log_pass(kb, log_a[lo:hi].contiguous(), fb, g, omega)
            f[:, lo:hi] = fb
            logw = torch.logaddexp(logw, lw.double())
            change += cb
        return logw.to(g.dtype), change

    def labels(self, mat: Streamed, log_v, linear, row_offset=0):
        h, n, _ = mat.shape
        out = torch.empty(h, n, dtype=torch.long, device=self.device)
        for lo, hi, kb in mat.kernel_blocks(self.inner):
            out[:, lo:hi] = self.inner.labels(kb, log_v, linear, row_offset + lo)
        return out
