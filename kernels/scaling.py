"""Fused scaling-form Sinkhorn iteration: ONE read of M per iteration.

Shapes: M (H, N, K), A (N,), U (H, N), V (H, K), float32 or float64, contiguous.
Program (p, h) owns the row blocks p, p + P, ... of head h (BLOCK_N rows each) and
the column partial W_PART[h, p, :]. For each of its row blocks it

    t = M_blk v            (BLOCK_K column tiles)
    u_blk = a_blk / t      (stored over U)
    W_PART[h, p] += M_blk^T u_blk   (the same tiles again, from L2)

and records sum |u_old/u_new - 1| in CHANGE_PART[h, p]. The host sums the
partials (deterministic: a fixed reduction order, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, max_programs


@triton.autotune(
    configs=configs([{"BLOCK_N": bn, "BLOCK_K": bk} for bn in (16, 32, 64) for bk in (128, 256, 512)],
                    {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K"],
    reset_to_zero=["W_PART", "CHANGE_PART"],
    restore_value=["U"],
)
@triton.jit
def _scaling_pass_kernel(M, A, U, V, W_PART, CHANGE_PART, NPROG, N, K,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = M.dtype.element_ty
    base = h.to(tl.int64) * N * K
    part = W_PART + (h * NPROG + pid).to(tl.int64) * K
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, n_blocks, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        roff = base + rows.to(tl.int64)[:, None] * K
        t = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            m = tl.load(M + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            v = tl.load(V + h * K + cols, mask=cmask, other=0.0)
            t += tl.sum(m * v[None, :], axis=1)
        a = tl.load(A + rows, mask=rmask, other=1.0)
        u_old = tl.load(U + h * N + rows, mask=rmask, other=1.0)
        u = a / tl.where(rmask, t, 1.0)
        change += tl.where(rmask, tl.abs(u_old.to(tl.float64) / u.to(tl.float64) - 1.0), 0.0)
        tl.store(U + h * N + rows, u, mask=rmask)
        u = tl.where(rmask, u, 0.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            m = tl.load(M + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            w = tl.sum(m * u[:, None], axis=0)
            tl.store(part + cols, tl.load(part + cols, mask=cmask, other=0.0) + w, mask=cmask)
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


def scaling_pass(M: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """u <- a / (M v) in place; returns (w = M^T u (H, K), sum |u_old/u_new - 1| (H,) float64)."""
    H, N, K = M.shape
    P = min(max_programs(M.device), N)
    w_part = torch.zeros(H, P, K, dtype=M.dtype, device=M.device)
    change_part = torch.zeros(H, P, dtype=torch.float64, device=M.device)

    _scaling_pass_kernel[(P, H)](M, a, u, v, w_part, change_part, P, N, K)
    return w_part.sum(1), change_part.sum(1)


def torch_reference(M, a, u, v):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().scaling_pass(M, a, u, v)
