"""Chunked (out-of-core) backend: the score matrix is streamed in row blocks, one
pass over the source per iteration, within a memory budget.

Each block is turned into its kernel rows by the fused C++ ``prepare`` (row max,
shift, exp) and passed through the same fused iteration as the in-memory solver,
so per entry a pass costs one exp on top of the read; the column sums of the
blocks are added up (log-sum-exp in the log domain). File sources are read by a
background thread into two reusable buffers while the previous block computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..source import CallableSource, NpyFileSource, TensorSource
from . import Prepared
from .cpu import CpuBackend

FIXED_OVERHEAD = 64 * 2**20  # allocator slack and small buffers, kept out of the block budget


@dataclass
class ChunkedScores:
    """What the front hands this backend instead of a tensor."""

    inner: TensorSource | NpyFileSource | CallableSource
    compute_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.inner.shape


@dataclass
class Streamed:
    """The kernel matrix of a source, recomputed block by block."""

    source: TensorSource | NpyFileSource | CallableSource
    rows: int
    lamb: float
    probs: bool
    exponentiate: bool
    dtype: torch.dtype
    progress: bool = False

    device = torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.source.shape

    def blocks(self, inner: CpuBackend, exponentiate: bool | None = None):
        expo = self.exponentiate if exponentiate is None else exponentiate
        n = self.shape[1]
        with tqdm(total=n, disable=not self.progress, desc="pass", unit="row", unit_scale=True, leave=False) as bar:
            for lo, hi, block in self.source.blocks(self.rows):
                yield lo, hi, inner.prepare(block.to(self.dtype).contiguous(), self.lamb, self.probs, expo)
                bar.update(hi - lo)


def _costs(source, dtype: torch.dtype) -> tuple[int, int]:
    """(fixed bytes, bytes per row of a block).

    Per row: two storage buffers (double buffering), the block in the compute dtype,
    the kernel rows, and a few per-row outputs. Fixed: about 12 N-long float64 vectors
    per head (duals, row max, row sums, labels, ...), the column vectors and slack.
    """
    h, n, k = source.shape
    item = torch.tensor([], dtype=dtype).element_size()
    storage = getattr(source, "storage_row_bytes", 2 * h * k * source.itemsize)  # a source may know better
    per_row = storage + 2 * h * k * item + h * 8 * 4
    fixed = FIXED_OVERHEAD + h * n * 8 * 12 + h * k * 8 * 16
    return fixed, per_row


def rows_per_block(source, dtype: torch.dtype, budget: int) -> int:
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


class ChunkedBackend:
    name = "chunked"

    def __init__(self, rows: int, progress: bool = False) -> None:
        self.inner = CpuBackend()
        self.rows, self.progress = rows, progress

    def prepare(self, source: ChunkedScores, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        h, n, k = source.shape
        dtype = source.compute_dtype
        mat = Streamed(source.inner, self.rows, lamb, probs, exponentiate, dtype, self.progress)
        rowmax = torch.empty(h, n, dtype=dtype)
        rowsum = torch.empty(h, n, dtype=torch.float64)
        rowmin = torch.empty(h, n, dtype=torch.float64)
        colmax = torch.full((h, k), float("-inf"), dtype=dtype)
        for lo, hi, p in mat.blocks(self.inner, exponentiate=False):
            rowmax[:, lo:hi], rowsum[:, lo:hi], rowmin[:, lo:hi] = p.rowmax, p.rowsum, p.rowmin
            torch.maximum(colmax, p.colmax, out=colmax)
        return Prepared(mat, rowmax, colmax, rowsum, rowmin)

    # Column sums are combined across blocks in float64, as the kernel does within a block.
    def scaling_pass(self, mat: Streamed, a, u, v):
        w = torch.zeros(v.shape, dtype=torch.float64)
        change = torch.zeros(u.shape[0], dtype=torch.float64)
        for lo, hi, p in mat.blocks(self.inner):
            ub = u[:, lo:hi].contiguous()
            wb, cb = self.inner.scaling_pass(p.mat, a[lo:hi].contiguous(), ub, v)
            u[:, lo:hi] = ub
            w += wb
            change += cb
        return w.to(v.dtype), change

    def log_pass(self, mat: Streamed, log_a, f, g):
        logw = torch.full(g.shape, float("-inf"), dtype=torch.float64)
        change = torch.zeros(f.shape[0], dtype=torch.float64)
        for lo, hi, p in mat.blocks(self.inner):
            fb = f[:, lo:hi].contiguous()
            lw, cb = self.inner.log_pass(p.mat, log_a[lo:hi].contiguous(), fb, g)
            f[:, lo:hi] = fb
            logw = torch.logaddexp(logw, lw.double())
            change += cb
        return logw.to(g.dtype), change

    def labels(self, mat: Streamed, log_v, linear):
        h, n, _ = mat.shape
        out = torch.empty(h, n, dtype=torch.long)
        for lo, hi, p in mat.blocks(self.inner):
            out[:, lo:hi] = self.inner.labels(p.mat, log_v, linear)
        return out
