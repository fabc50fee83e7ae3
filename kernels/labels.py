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

from ._common import check_tensors, configs, prune_by_vec, tiles, union, vector_width

TIE_ULPS = 64


@triton.jit
def _tile_values(X, COL, roff, col_off, cols, rmask, K, LINEAR: tl.constexpr):
    """M_ij * v_j (LINEAR) or L_ij + g_j of a (rows, cols) tile; -inf outside the K columns."""
    cmask = cols < K
    x = tl.load(X + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    c = tl.load(COL + col_off + cols, mask=cmask, other=0.0)
    val = x * c[None, :] if LINEAR else x + c[None, :]
    return tl.where(cmask[None, :], val, float("-inf"))


# Of (16, 64) x (128, 512) x (4, 8 warps), these compile without spills in float32 and float64 on sm_80 and
# sm_90a; pruned for spilling: 64 x 512, 64 x 128 at 4 warps, 16 x 128 at 8 warps (8 B in float64).
GPU_CONFIGS = tiles((16, 128, 4), (16, 512, 4), (16, 512, 8), (64, 128, 8))
# Odd K (VEC = 1, scalar loads): 64 x 128 spills 408-488 B in both dtypes.
NARROW_CONFIGS = {(4, 1): GPU_CONFIGS[:3], (8, 1): GPU_CONFIGS[:3]}


def configs_for(element_size: int, vec: int) -> list[triton.Config]:
    """The configs for a matrix of this element size read in VEC-wide loads."""
    return NARROW_CONFIGS.get((element_size, vec), GPU_CONFIGS)


@triton.autotune(
    configs=configs(union(GPU_CONFIGS, *NARROW_CONFIGS.values()), {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K", "LINEAR"],
    prune_configs_by={"early_config_prune": prune_by_vec(configs_for, "X")},
)
@triton.jit
def _labels_kernel(X, COL, OUT, N, K, ROW_OFFSET, TIE_SLACK: tl.float64, VEC: tl.constexpr, LINEAR: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    dt = X.dtype.element_ty
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    roff = h.to(tl.int64) * N * KS + rows.to(tl.int64)[:, None] * KS
    cols0 = tl.arange(0, BLOCK_K)
    # pass 1: the row maximum
    best = tl.full([BLOCK_N], float("-inf"), dt)
    for k0 in range(0, KS, BLOCK_K):
        cols = k0 + cols0
        val = _tile_values(X, COL, roff, h * KS, cols, rmask, KS, LINEAR)
        best = tl.maximum(best, tl.max(val, axis=1))
    # pass 2: the tied value nearest after the row's start column (the tile is still in cache)
    slack = tl.full([], TIE_SLACK, dt)
    floor = best - slack * best if LINEAR else best - slack * tl.maximum(tl.abs(best), 1.0)
    start = ((ROW_OFFSET + rows.to(tl.int64)) % K).to(tl.int32)
    dist = tl.zeros([BLOCK_N], tl.int32) + K  # (j - start) mod K of the first tie
    for k0 in range(0, KS, BLOCK_K):
        cols = k0 + cols0
        val = _tile_values(X, COL, roff, h * KS, cols, rmask, KS, LINEAR)
        tied = (val >= floor[:, None]) & (cols < KS)[None, :]
        steps = cols[None, :] - start[:, None]  # in (-K, K): mod K without a division per entry
        steps = tl.where(steps < 0, steps + KS, steps)
        dist = tl.minimum(dist, tl.min(tl.where(tied, steps, KS), axis=1))
    label = tl.where(dist >= KS - start, dist - (KS - start), start + dist)  # (start + dist) mod K, no overflow
    tl.store(OUT + h.to(tl.int64) * N + rows, label.to(tl.int64), mask=rmask)


def labels(mat: torch.Tensor, log_v: torch.Tensor, linear: bool, row_offset: int = 0) -> torch.Tensor:
    H, N, K = mat.shape
    if not isinstance(log_v, torch.Tensor) or tuple(log_v.shape) != (H, K):
        raise ValueError(f"labels: log_v must be an (H, K) = {(H, K)} tensor, got "
                         f"{tuple(getattr(log_v, 'shape', ()))}")
    col = (torch.exp(log_v) if linear else log_v).to(device=mat.device, dtype=mat.dtype).contiguous()
    check_tensors("labels", (torch.float32, torch.float64), mat=(mat, (H, N, K)), log_v=(col, (H, K)))
    out = torch.empty(H, N, dtype=torch.int64, device=mat.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), H)

    slack = TIE_ULPS * torch.finfo(mat.dtype).eps
    _labels_kernel[grid](mat, col, out, N, K, row_offset, slack, VEC=vector_width(K, mat.element_size()),
                         LINEAR=linear)
    return out


def torch_reference(mat, log_v, linear, row_offset=0):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().labels(mat, log_v, linear, row_offset)
