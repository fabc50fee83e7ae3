"""Fused log-domain Sinkhorn iteration: stable for any lamb in float32.

Shapes: L (H, N, K) log kernel, LOG_A (N,), F (H, N), G (H, K); float32/float64,
contiguous. Program (p, h) owns the row blocks p, p + P, ... of head h and the
column partials W_PART[h, p, :] (sums) and MX_PART[h, p, :] (maxima). Per block:

    r_i, s_i = online max / sum-exp of L_ij + g_j over the column tiles
    f_i = log a_i - r_i - log s_i,   alpha_i = a_i / s_i
    W_PART += sum_i alpha_i exp(L_ij + g_j - r_i)      (entries <= 1: no overflow)
    MX_PART = max(MX_PART, max_i L_ij + g_j - r_i + log alpha_i)

The host sums / maxes the partials: log W_j = log(sum) where the sum is a normal
number, else the max (a lower bound within log N of the true value, for columns
whose mass underflows in a transient state). log W is the column mass of (f, g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, max_programs


@triton.autotune(
    configs=configs([{"BLOCK_N": bn, "BLOCK_K": bk} for bn in (16, 32) for bk in (128, 256, 512)],
                    {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K"],
    reset_to_zero=["W_PART", "CHANGE_PART"],
    restore_value=["F", "MX_PART"],
)
@triton.jit
def _log_pass_kernel(L, LOG_A, F, G, W_PART, MX_PART, CHANGE_PART, NPROG, N, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = L.dtype.element_ty
    base = h.to(tl.int64) * N * K
    poff = (h * NPROG + pid).to(tl.int64) * K
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, n_blocks, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        roff = base + rows.to(tl.int64)[:, None] * K
        r = tl.full([BLOCK_N], float("-inf"), dt)
        s = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            x = tl.load(L + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.load(G + h * K + cols, mask=cmask, other=0.0)
            z = tl.where(cmask[None, :], x + g[None, :], float("-inf"))
            r_new = tl.maximum(r, tl.max(z, axis=1))
            s = s * tl.exp(r - r_new) + tl.sum(tl.exp(z - r_new[:, None]), axis=1)
            r = r_new
        log_a = tl.load(LOG_A + rows, mask=rmask, other=0.0)
        log_alpha = log_a - tl.log(s)
        f_new = log_alpha - r
        f_old = tl.load(F + h * N + rows, mask=rmask, other=0.0)
        change += tl.where(rmask, tl.abs(tl.exp(f_old.to(tl.float64) - f_new.to(tl.float64)) - 1.0), 0.0)
        tl.store(F + h * N + rows, f_new, mask=rmask)
        alpha = tl.where(rmask, tl.exp(log_alpha), 0.0)
        shift = tl.where(rmask, log_alpha - r, float("-inf"))
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            x = tl.load(L + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.load(G + h * K + cols, mask=cmask, other=0.0)
            z = x + g[None, :]
            e = tl.exp(z - r[:, None])
            w = tl.sum(alpha[:, None] * e, axis=0)
            mx = tl.max(z + shift[:, None], axis=0)
            tl.store(W_PART + poff + cols, tl.load(W_PART + poff + cols, mask=cmask, other=0.0) + w, mask=cmask)
            old = tl.load(MX_PART + poff + cols, mask=cmask, other=float("-inf"))
            tl.store(MX_PART + poff + cols, tl.maximum(old, mx), mask=cmask)
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


def log_pass(L: torch.Tensor, log_a: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """f <- log a - LSE_j(L + g) in place; returns (log column mass (H, K), row change (H,) float64)."""
    H, N, K = L.shape
    P = min(max_programs(L.device), N)
    w_part = torch.zeros(H, P, K, dtype=L.dtype, device=L.device)
    mx_part = torch.full((H, P, K), float("-inf"), dtype=L.dtype, device=L.device)
    change_part = torch.zeros(H, P, dtype=torch.float64, device=L.device)

    _log_pass_kernel[(P, H)](L, log_a, f, g, w_part, mx_part, change_part, P, N, K)
    w = w_part.sum(1)
    tiny = torch.finfo(L.dtype).tiny * 1e8
    logw = torch.where(w > tiny, torch.log(w), mx_part.amax(1))
    return logw, change_part.sum(1)


def torch_reference(L, log_a, f, g):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().log_pass(L, log_a, f, g)
