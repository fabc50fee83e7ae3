"""Labels kernel: argmax_j (M_ij * v_j) for the scaling kernel or (L_ij + g_j) for the
log kernel, without materialising the plan. Ties go round the clusters: row i (global
index ROW_OFFSET + i) takes the first maximum at or after column i mod K, wrapping
around, so rows with equal scores get balanced labels.

Shapes: X (H, N, K), COL (H, K) (v or g), OUT int64 (H, N). Program (b, h) owns
BLOCK_N rows of head h and scans them in BLOCK_K column tiles twice: the row maximum,
then the first value within TIE_SLACK of it (relative; for log values relative to
max(1, |max|)) counting from the row's start column. Both scans read the same rows, so
the second one mostly hits L2. Values within TIE_ULPS roundings of the maximum count as
tied, as in the CPU kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs

TIE_ULPS = 64


@triton.jit
def _tile_values(X, COL, roff, col_off, cols, rmask, K, LINEAR: tl.constexpr):
    """M_ij * v_j (LINEAR) or L_ij + g_j of a (rows, cols) tile; -inf outside the K columns."""
    cmask = cols < K
    x = tl.load(X + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    c = tl.load(COL + col_off + cols, mask=cmask, other=0.0)
    val = x * c[None, :] if LINEAR else x + c[None, :]
    return tl.where(cmask[None, :], val, float("-inf"))


@triton.autotune(
    configs=configs([{"BLOCK_N": bn, "BLOCK_K": bk} for bn in (16, 64) for bk in (128, 512)],
                    {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K", "LINEAR"],
)
@triton.jit
def _labels_kernel(X, COL, OUT, N, K, ROW_OFFSET, TIE_SLACK, LINEAR: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    dt = X.dtype.element_ty
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    roff = h.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K
    cols0 = tl.arange(0, BLOCK_K)
    # pass 1: the row maximum
    best = tl.full([BLOCK_N], float("-inf"), dt)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        val = _tile_values(X, COL, roff, h * K, cols, rmask, K, LINEAR)
        best = tl.maximum(best, tl.max(val, axis=1))
    # pass 2: the tied value nearest after the row's start column (the tile is still in cache)
    floor = best - TIE_SLACK * best if LINEAR else best - TIE_SLACK * tl.maximum(tl.abs(best), 1.0)
    start = (ROW_OFFSET + rows.to(tl.int64)) % K
    dist = tl.zeros([BLOCK_N], tl.int64) + K  # (j - start) mod K of the first tie
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        val = _tile_values(X, COL, roff, h * K, cols, rmask, K, LINEAR)
        tied = (val >= floor[:, None]) & (cols < K)[None, :]
        steps = (cols[None, :].to(tl.int64) - start[:, None] + K) % K
        dist = tl.minimum(dist, tl.min(tl.where(tied, steps, K), axis=1))
    tl.store(OUT + h * N + rows, (start + dist) % K, mask=rmask)


def labels(mat: torch.Tensor, log_v: torch.Tensor, linear: bool, row_offset: int = 0) -> torch.Tensor:
    H, N, K = mat.shape
    col = (torch.exp(log_v) if linear else log_v).to(mat.dtype).contiguous()
    out = torch.empty(H, N, dtype=torch.int64, device=mat.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), H)

    slack = TIE_ULPS * torch.finfo(mat.dtype).eps
    _labels_kernel[grid](mat, col, out, N, K, row_offset, slack, LINEAR=linear)
    return out


def torch_reference(mat, log_v, linear, row_offset=0):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().labels(mat, log_v, linear, row_offset)
