"""Fused log-domain Sinkhorn iteration: stable for any lamb in float32, one read of L.

Shapes: L (H, N, K) log kernel, LOG_A (N,), F (H, N), G (H, K); float32/float64, contiguous (the
launcher checks); W_PART, MX_PART (H, P, K) column partials in L's dtype, CHANGE_PART (H, P)
float64. Program (p, h) owns the row blocks p, p + P, ... of head h and the column partials
W_PART[h, p, :] (sums) and MX_PART[h, p, :] (maxima). Per block:

    r_i, s_i = max / sum-exp of L_ij + g_j over the row
    f_i = log a_i - r_i - log s_i,   alpha_i = a_i / s_i   (over-relaxed: alpha_i = exp(f_i + r_i))
    W_PART += sum_i alpha_i exp(L_ij + g_j - r_i)      (entries <= 1: no overflow)
    MX_PART = max(MX_PART, max_i L_ij + g_j - r_i + log alpha_i)   (the log of W_PART's largest term)

The host sums / maxes the partials: log W_j = log(sum) where the sum is a normal
number, else the max (a lower bound within log N of the true value, for columns
whose mass underflows in a transient state). log W is the column mass of (f, g).

As in kernels/scaling.py, two kernels by the length of a row: ``_log_resident_kernel`` (rows of
at most RESIDENT_BYTES) loads a row block into registers once, takes r and s from it and adds the
column partials from the same registers (one exponential per entry, partials in registers across
the program's blocks); ``_log_stream_kernel`` (longer rows) sweeps the row block twice in BLOCK_K
tiles, an online max / sum-exp then the partials, re-reading the block (from L2 if it is still there).
The steps shared with kernels/implicit.py are @triton.jit helpers in kernels/_common.py: ``online_lse``,
``update_row_potentials`` (f in place, with the over-relaxation; alpha and the shift), ``column_mass``,
``column_max`` and ``add_column_partials``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    add_column_partials,
    check_tensors,
    column_mass,
    column_max,
    configs,
    log_column_mass,
    max_programs,
    online_lse,
    prune_by_vec,
    tiles,
    union,
    update_row_potentials,
    vector_width,
)
from .scaling import RESIDENT_CONFIGS, prune_resident, resident, resident_block_n  # one resident space for both

# Streaming kernel: of (16, 32) x (128, 256, 512) x (4, 8 warps), these compile without spills in float64
# on sm_80 and sm_90a when rows start on 16-byte boundaries (float32 keeps a subset, below); pruned for
# spilling: 16 x 256 at 4 warps, 16 x 512, 32 x 128 at 4 warps, 32 x 256, 32 x 512.
GPU_CONFIGS = tiles((16, 128, 8), (16, 128, 4), (16, 256, 8), (32, 128, 8))
# Other load widths spill elsewhere: float32 in 16-byte loads at 16 x 128 / 4 warps (4 B, sm_80, with the
# over-relaxed update); odd K in float32 at 16 x 128 / 8 warps (8 B, sm_80), in float64 at 16 x 128 / 4
# warps, 16 x 256 and 32 x 128 (48-424 B); float32 with 8-byte loads at 16 x 128 / 4 warps, 16 x 256 and
# 32 x 128 (8-24 B). Keyed by (element size, VEC).
NARROW_CONFIGS = {(4, 4): [GPU_CONFIGS[0], *GPU_CONFIGS[2:]], (4, 1): GPU_CONFIGS[1:], (8, 1): GPU_CONFIGS[:1],
                  (4, 2): GPU_CONFIGS[:1]}


def stream_configs(element_size: int, vec: int) -> list[triton.Config]:
    """The streaming kernel's configs for a matrix of this element size read in VEC-wide loads."""
    return NARROW_CONFIGS.get((element_size, vec), GPU_CONFIGS)


@triton.autotune(
    configs=configs(RESIDENT_CONFIGS, {"THREAD_BYTES": 16}),
    key=["K"],
    prune_configs_by={"early_config_prune": prune_resident("L")},
    restore_value=["F"],
)
@triton.heuristics({"BLOCK_N": lambda a: resident_block_n(a["THREAD_BYTES"], a["num_warps"], a["K_PAD"],
                                                          a["L"].element_size(), a["VEC"])})
@triton.jit
def _log_resident_kernel(L, LOG_A, F, G, W_PART, MX_PART, CHANGE_PART, NPROG, N, K, OMEGA: tl.float64,
                         VEC: tl.constexpr, K_PAD: tl.constexpr, THREAD_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = L.dtype.element_ty
    omega = tl.full([], OMEGA, dt)  # OMEGA arrives in float64; the relaxation runs in dt
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    base = h.to(tl.int64) * N * KS
    frow = h.to(tl.int64) * N
    cols = tl.arange(0, K_PAD)
    cmask = cols < KS
    g = tl.load(G + h * KS + cols, mask=cmask, other=0.0)
    w_acc = tl.zeros([K_PAD], dt)
    mx_acc = tl.full([K_PAD], float("-inf"), dt)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, tl.cdiv(N, BLOCK_N), NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        x = tl.load(L + base + rows.to(tl.int64)[:, None] * KS + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        z = tl.where(cmask[None, :], x + g[None, :], float("-inf"))
        r = tl.max(z, axis=1)
        e = tl.exp(z - r[:, None])
        log_a = tl.load(LOG_A + rows, mask=rmask, other=0.0)
        log_s = tl.log(tl.sum(e, axis=1))
        alpha, shift, change = update_row_potentials(F + frow, rows, rmask, log_a, log_s, r, omega, change)
        w_acc += tl.sum(alpha[:, None] * e, axis=0)  # column_mass(alpha, z, r), reusing e
        mx_acc = tl.maximum(mx_acc, column_max(z, shift))
    poff = (h * NPROG + pid).to(tl.int64) * KS
    tl.store(W_PART + poff + cols, w_acc, mask=cmask)
    tl.store(MX_PART + poff + cols, mx_acc, mask=cmask)
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


@triton.autotune(
    configs=configs(union(GPU_CONFIGS, *NARROW_CONFIGS.values()), {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K"],
    prune_configs_by={"early_config_prune": prune_by_vec(stream_configs, "L")},
    reset_to_zero=["W_PART", "CHANGE_PART"],
    restore_value=["F", "MX_PART"],
)
@triton.jit
def _log_stream_kernel(L, LOG_A, F, G, W_PART, MX_PART, CHANGE_PART, NPROG, N, K, OMEGA: tl.float64,
                       VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = L.dtype.element_ty
    omega = tl.full([], OMEGA, dt)  # OMEGA arrives in float64; the relaxation runs in dt
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    base = h.to(tl.int64) * N * KS
    frow = h.to(tl.int64) * N
    poff = (h * NPROG + pid).to(tl.int64) * KS
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, n_blocks, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        roff = base + rows.to(tl.int64)[:, None] * KS
        r = tl.full([BLOCK_N], float("-inf"), dt)
        s = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < KS
            x = tl.load(L + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.load(G + h * KS + cols, mask=cmask, other=0.0)
            z = tl.where(cmask[None, :], x + g[None, :], float("-inf"))
            r, s = online_lse(r, s, z)
        log_a = tl.load(LOG_A + rows, mask=rmask, other=0.0)
        alpha, shift, change = update_row_potentials(F + frow, rows, rmask, log_a, tl.log(s), r, omega, change)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < KS
            x = tl.load(L + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.load(G + h * KS + cols, mask=cmask, other=0.0)
            z = x + g[None, :]
            w = column_mass(alpha, z, r)
            add_column_partials(W_PART, MX_PART, poff, cols, cmask, w, column_max(z, shift))
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


def log_pass(L: torch.Tensor, log_a: torch.Tensor, f: torch.Tensor, g: torch.Tensor, omega: float = 1.0):
    """f <- log a - LSE_j(L + g) in place, over-relaxed per row by ``omega`` (``selflabel.accel``);
    returns (log column mass (H, K), row change (H,) float64)."""
    H, N, K = L.shape
    check_tensors("log_pass", (torch.float32, torch.float64), L=(L, (H, N, K)), log_a=(log_a, (N,)),
                  f=(f, (H, N)), g=(g, (H, K)))
    P = min(max_programs(L.device), N)
    vec = vector_width(K, L.element_size())
    change_part = torch.zeros(H, P, dtype=torch.float64, device=L.device)
    if resident(K, L.element_size()):  # every program writes its rows of the partials
        w_part = torch.empty(H, P, K, dtype=L.dtype, device=L.device)
        mx_part = torch.empty(H, P, K, dtype=L.dtype, device=L.device)
        _log_resident_kernel[(P, H)](L, log_a, f, g, w_part, mx_part, change_part, P, N, K, float(omega), VEC=vec,
                                     K_PAD=triton.next_power_of_2(K))
    else:
        w_part = torch.zeros(H, P, K, dtype=L.dtype, device=L.device)
        mx_part = torch.full((H, P, K), float("-inf"), dtype=L.dtype, device=L.device)
        _log_stream_kernel[(P, H)](L, log_a, f, g, w_part, mx_part, change_part, P, N, K, float(omega), VEC=vec)
    return log_column_mass(w_part.sum(1), mx_part.amax(1)), change_part.sum(1)


def torch_reference(L, log_a, f, g, omega=1.0):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().log_pass(L, log_a, f, g, omega)
