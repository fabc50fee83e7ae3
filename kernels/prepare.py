"""exp-prob kernel: scores -> kernel matrix, one read of S and one write of the output.

Shapes: S (H, N, K) float32/float64, contiguous. Program (p, h) owns the row blocks
p, p + P, p + 2P, ... of head h (BLOCK_N rows each) and walks each row in BLOCK_K
column tiles twice (row statistics, then the output; the second read hits L2).

    x = log S (probs) or S;  m_i = max_j x_ij
    OUT_ij = lamb (x_ij - m_i)              EXPONENTIATE = False  (log kernel)
    OUT_ij = exp(lamb (x_ij - m_i))         EXPONENTIATE = True   (scaling kernel)

Outputs: OUT (H, N, K), ROWMAX m (H, N), ROWSUM / ROWMIN of the raw scores (H, N)
(validation), and COLMAX_PART (H, P, K): each program's column max of lamb (x - m),
reduced with a max after the launch. Rows with a NaN or no finite maximum are
written as 0 (the solver front raises on them); -inf entries are kernel zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensors, configs, max_programs, prune_by_vec, tiles, union, vector_width

SUM_SCALE: tl.constexpr = tl.constexpr(5.421010862427522e-20)  # 2**-64


# Of (8, 32) x (128, 512) x (4, 8 warps), these compile without spills for every flag, dtype and target
# when rows start on 8- or 16-byte boundaries (benchmarks/results/kernel-resources.json); pruned for
# spilling: 32 x 512, 32 x 128 at 4 warps, and 8 x 128 (4 to 8 B of spill in some flag / dtype / target).
GPU_CONFIGS = tiles((32, 128, 8), (8, 512, 8), (8, 512, 4))
# Narrower loads spill elsewhere: odd K (VEC = 1: scalar loads, a 64-bit address per element) in float32 at
# 8 x 512 (4-36 B), in float64 at 32 x 128 (128-188 B), 8 x 256 and 16 x 256 (32-80 B); float32 with 8-byte
# loads (K = 2 mod 4) at 8 x 512 / 8 warps (8-12 B). Keyed by (element size, VEC).
NARROW_CONFIGS = {(4, 1): tiles((32, 128, 8), (16, 128, 8)), (8, 1): tiles((16, 128, 8), (8, 512, 8), (8, 512, 4)),
                  (4, 2): tiles((32, 128, 8), (8, 512, 4))}


def configs_for(element_size: int, vec: int) -> list[triton.Config]:
    """The configs the autotuner tries for a matrix of this element size read in VEC-wide loads."""
    return NARROW_CONFIGS.get((element_size, vec), GPU_CONFIGS)


@triton.autotune(
    configs=configs(union(GPU_CONFIGS, *NARROW_CONFIGS.values()), {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K", "PROBS", "EXPONENTIATE"],
    prune_configs_by={"early_config_prune": prune_by_vec(configs_for, "S")},
)
@triton.jit
def _prepare_kernel(S, OUT, ROWMAX, ROWSUM, ROWMIN, COLMAX_PART, NPROG, N, K, lamb: tl.float64, VEC: tl.constexpr,
                    PROBS: tl.constexpr, EXPONENTIATE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = S.dtype.element_ty
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    base = h.to(tl.int64) * N * KS
    hrow = h.to(tl.int64) * N
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    for blk in tl.range(pid, n_blocks, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        roff = base + rows.to(tl.int64)[:, None] * KS
        mx = tl.full([BLOCK_N], float("-inf"), dt)
        mn = tl.full([BLOCK_N], float("inf"), dt)
        sm = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            mask = rmask[:, None] & (cols < KS)[None, :]
            x = tl.load(S + roff + cols[None, :], mask=mask, other=0.0)
            mx = tl.maximum(mx, tl.max(tl.where(mask, x, float("-inf")), axis=1))
            mn = tl.minimum(mn, tl.min(tl.where(mask, x, float("inf")), axis=1))
            sm += tl.sum(x * SUM_SCALE, axis=1)  # scaled by 2**-64: finite scores never overflow it
        m = tl.log(mx) if PROBS else mx
        ok = (sm == sm) & (m - m == 0)  # no NaN (or +inf and -inf) in the row, finite max; -inf entries are fine
        tl.store(ROWMAX + hrow + rows, m, mask=rmask)
        tl.store(ROWSUM + hrow + rows, sm.to(tl.float64) * 18446744073709551616.0, mask=rmask)
        tl.store(ROWMIN + hrow + rows, mn.to(tl.float64), mask=rmask)
        m_safe = tl.where(ok, m, 0.0)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < KS
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(S + roff + cols[None, :], mask=mask, other=1.0)
            lx = tl.log(x) if PROBS else x
            o = tl.where(ok[:, None], tl.full([], lamb, dt) * (lx - m_safe[:, None]), 0.0)
            part = COLMAX_PART + (h * NPROG + pid).to(tl.int64) * KS + cols
            cm = tl.max(tl.where(mask, o, float("-inf")), axis=0)
            tl.store(part, tl.maximum(tl.load(part, mask=cmask, other=float("-inf")), cm), mask=cmask)
            if EXPONENTIATE:
                o = tl.exp(o)
            tl.store(OUT + roff + cols[None, :], o.to(dt), mask=mask)


def prepare(scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool):
    """Launch the exp-prob kernel; returns (mat, rowmax, colmax, rowsum, rowmin)."""
    H, N, K = scores.shape
    scores = scores.contiguous()
    check_tensors("prepare", (torch.float32, torch.float64), scores=(scores, (H, N, K)))
    out = torch.empty_like(scores)
    rowmax = torch.empty(H, N, dtype=scores.dtype, device=scores.device)
    rowsum = torch.empty(H, N, dtype=torch.float64, device=scores.device)
    rowmin = torch.empty(H, N, dtype=torch.float64, device=scores.device)
    P = min(max_programs(scores.device), N)
    colmax_part = torch.full((H, P, K), float("-inf"), dtype=scores.dtype, device=scores.device)

    _prepare_kernel[(P, H)](scores, out, rowmax, rowsum, rowmin, colmax_part, P, N, K, float(lamb),
                          VEC=vector_width(K, scores.element_size()), PROBS=probs, EXPONENTIATE=exponentiate)
    return out, rowmax, colmax_part.amax(1), rowsum, rowmin


def torch_reference(scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool):
    from selflabel.backends.torch_ref import TorchBackend

    return tuple(TorchBackend().prepare(scores, lamb, probs, exponentiate))[:5]
