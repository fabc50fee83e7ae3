"""Labels kernel: argmax_j (M_ij * v_j) for the scaling kernel or (L_ij + g_j) for the
log kernel, first index on ties, without materialising the plan.

Shapes: X (H, N, K), COL (H, K) (v or g), OUT int64 (H, N). Program (b, h) owns
BLOCK_N rows of head h and scans them in BLOCK_K column tiles, keeping the best
value and index per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs


@triton.autotune(
    configs=configs([{"BLOCK_N": bn, "BLOCK_K": bk} for bn in (16, 64) for bk in (128, 512)],
                    {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K", "LINEAR"],
)
@triton.jit
def _labels_kernel(X, COL, OUT, N, K, LINEAR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    dt = X.dtype.element_ty
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    roff = h.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K
    best = tl.full([BLOCK_N], float("-inf"), dt)
    arg = tl.zeros([BLOCK_N], tl.int64)
    cols0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        cmask = cols < K
        x = tl.load(X + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        c = tl.load(COL + h * K + cols, mask=cmask, other=0.0)
        val = x * c[None, :] if LINEAR else x + c[None, :]
        val = tl.where(cmask[None, :], val, float("-inf"))
        tile_best = tl.max(val, axis=1)
        is_best = val == tile_best[:, None]
        tile_arg = tl.min(tl.where(is_best, cols[None, :], K), axis=1).to(tl.int64)  # first index
        better = tile_best > best
        arg = tl.where(better | (k0 == 0), tile_arg, arg)
        best = tl.where(better, tile_best, best)
    tl.store(OUT + h * N + rows, arg, mask=rmask)


def labels(mat: torch.Tensor, log_v: torch.Tensor, linear: bool) -> torch.Tensor:
    H, N, K = mat.shape
    col = (torch.exp(log_v) if linear else log_v).to(mat.dtype).contiguous()
    out = torch.empty(H, N, dtype=torch.int64, device=mat.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), H)

    _labels_kernel[grid](mat, col, out, N, K, LINEAR=linear)
    return out


def torch_reference(mat, log_v, linear):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().labels(mat, log_v, linear)
