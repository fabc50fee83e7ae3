"""Implicit log-domain Sinkhorn iteration: scores recomputed from features and prototypes.

The N x K matrix is never stored. Each score tile ``S = X W^T`` is computed with ``tl.dot``
(bfloat16/float16 features as they are; float32 features at the precision torch's
``torch.get_float32_matmul_precision()`` asks for, see ``dot_precision``; float32 accumulation;
float64 features with an exact broadcast-multiply-sum, slow but correct) and fused with the
log-domain pass of ``kernels/logdomain.py``:

    L_ij = lamb * (S_ij + b_j - m_i)                       (m: row maxima of S + b, (N,))
    r_i, s_i = online max / sum-exp of L_ij + g_j over the column tiles
    f_i = log a_i - r_i - log s_i,   alpha_i = a_i / s_i   (over-relaxed: alpha_i = exp(f_i + r_i))
    W_PART += sum_i alpha_i exp(L_ij + g_j - r_i)
    MX_PART = max(MX_PART, max_i L_ij + g_j - r_i + log alpha_i)   (the log of W_PART's largest term)

in the steps it shares with that pass (kernels/_common.py: ``online_lse``, ``update_row_potentials``,
``column_mass``, ``column_max``, ``add_column_partials``).

Shapes: X (N, D), W (K, D) float16/bfloat16/float32/float64; BIAS (K,), ROWMAX (N,), LOG_A (N,),
F (N,), G (K,) and the column partials W_PART, MX_PART (P, K) float32 (float64 for float64
features); CHANGE_PART (P,) float64; one head per launch, all contiguous. Program p owns the row
blocks p, p + P, ... and the column partials W_PART[p, :], MX_PART[p, :]; per row block it sweeps
the column tiles twice (row LSE, then the column partials of the updated rows), recomputing the
tile from X and W each time: one launch and memory O(N*D + P*K) per iteration.
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
    update_row_potentials,
)


@triton.jit
def _score_tile(X, W, BIAS, rows, cols, rmask, cmask, D, lamb, m,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, PRECISION: tl.constexpr):
    """lamb * (X[rows] W[cols]^T + b[cols] - m[rows]) as a (BLOCK_N, BLOCK_K) tile in the compute dtype."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float64 if EXACT else tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        x = tl.load(X + rows.to(tl.int64)[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None] * D + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if EXACT:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]
    return tl.full([], lamb, acc.dtype) * (acc - m[:, None])


# tl.dot configs (float16 / bfloat16 / float32 features). Of (64, 128) x (64, 128) x (32, 64) x (4, 8 warps),
# these compile without spills for every dtype on sm_80 and sm_90a at one TF32 product; the other twelve spill
# (most only on sm_80, 128 x 128 on both; up to 1.2 KB). float32 in "ieee" or "tf32x3" needs more registers:
# two of the four spill on sm_90a (24 to 72 bytes); the autotuner times all four. Shared memory stays under
# both targets' limits for all sixteen (at most 128 KiB on sm_80 and 192 KiB on sm_90a, for 128 x 128 x 64).
GPU_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": 32}, num_warps=w)
               for bn, bk, w in ((64, 64, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8))]
# float64 (EXACT) multiplies a (BLOCK_N, BLOCK_K, BLOCK_D) broadcast product in registers: the tl.dot tiles
# above took minutes to compile there and spilled (64 x 64 x 32 did not finish in 5 minutes; 16 x 64 x 32
# spilled 8 KB, 64 x 64 x 4 3 KB). These compile in seconds without spills on sm_80 and sm_90a.
EXACT_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 8}, num_warps=8),
                 triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 4}, num_warps=4),
                 triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 8}, num_warps=4)]


def configs_for(exact: bool) -> list:
    """The configs the autotuner tries for tl.dot (float16/bfloat16/float32 features) or EXACT (float64)."""
    return EXACT_CONFIGS if exact else GPU_CONFIGS


def _prune(cfgs, nargs, **kwargs):
    keep = configs_for(kwargs["EXACT"])
    return [c for c in cfgs if c in keep]


@triton.autotune(
    configs=configs(GPU_CONFIGS + EXACT_CONFIGS, {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}),
    key=["K", "D", "EXACT", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["W_PART", "CHANGE_PART"],
    restore_value=["F", "MX_PART"],
)
@triton.jit
def _implicit_log_pass_kernel(X, W, BIAS, ROWMAX, LOG_A, F, G, W_PART, MX_PART, CHANGE_PART, NPROG, N, K, D,
                              lamb: tl.float64, OMEGA: tl.float64,
                              HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    dt = F.dtype.element_ty
    omega = tl.full([], OMEGA, dt)  # OMEGA arrives in float64; the relaxation runs in dt
    poff = pid.to(tl.int64) * K
    cols0 = tl.arange(0, BLOCK_K)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, tl.cdiv(N, BLOCK_N), NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        m = tl.load(ROWMAX + rows, mask=rmask, other=0.0)
        r = tl.full([BLOCK_N], float("-inf"), dt)
        s = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            x = _score_tile(X, W, BIAS, rows, cols, rmask, cmask, D, lamb, m,
                            BLOCK_N, BLOCK_K, BLOCK_D, HAS_BIAS, EXACT, PRECISION).to(dt)
            g = tl.load(G + cols, mask=cmask, other=0.0)
            z = tl.where(cmask[None, :], x + g[None, :], float("-inf"))
            r, s = online_lse(r, s, z)
        log_a = tl.load(LOG_A + rows, mask=rmask, other=0.0)
        alpha, shift, change = update_row_potentials(F, rows, rmask, log_a, tl.log(s), r, omega, change)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            x = _score_tile(X, W, BIAS, rows, cols, rmask, cmask, D, lamb, m,
                            BLOCK_N, BLOCK_K, BLOCK_D, HAS_BIAS, EXACT, PRECISION).to(dt)
            z = x + tl.load(G + cols, mask=cmask, other=0.0)[None, :]
            w = column_mass(alpha, z, r)
            add_column_partials(W_PART, MX_PART, poff, cols, cmask, w, column_max(z, shift))
    tl.store(CHANGE_PART + pid, tl.sum(change, axis=0))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for features of ``dtype``. float32 follows
    ``torch.get_float32_matmul_precision()``: "highest" (torch's default) multiplies in float32
    ("ieee"), "high" in three TF32 products ("tf32x3", close to float32), "medium" in one ("tf32",
    a 10-bit mantissa: scores off by ~1e-3 relative). Other dtypes multiply as they are."""
    if dtype != torch.float32:
        return "tf32"  # not read for float16/bfloat16 operands
    return {"highest": "ieee", "high": "tf32x3"}.get(torch.get_float32_matmul_precision(), "tf32")


def implicit_log_pass(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lamb: float, rowmax: torch.Tensor,
                      log_a: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                      omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One head: f <- log a - LSE_j(L + g) in place (L from x, w, bias), over-relaxed per row by ``omega``;
    returns (log column mass (K,), change)."""
    N, D = x.shape
    K = w.shape[0]
    check_tensors("implicit_log_pass", (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                  x=(x, (N, D)), w=(w, (K, D)))
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # tl.dot accumulates in float32
    check_tensors("implicit_log_pass", (dt,), f=(f, (N,)), g=(g, (K,)), rowmax=(rowmax, (N,)), log_a=(log_a, (N,)),
                  **({} if bias is None else {"bias": (bias, (K,))}))
    if f.device != x.device:
        raise ValueError(f"implicit_log_pass: the potentials are on {f.device}, the features on {x.device}")
    P = min(max_programs(x.device), N)
    w_part = torch.zeros(P, K, dtype=f.dtype, device=f.device)
    mx_part = torch.full((P, K), float("-inf"), dtype=f.dtype, device=f.device)
    change_part = torch.zeros(P, dtype=torch.float64, device=f.device)
    exact = x.dtype == torch.float64
    _implicit_log_pass_kernel[(P,)](x, w, bias if bias is not None else w, rowmax, log_a, f, g, w_part, mx_part,
                                    change_part, P, N, K, D, float(lamb), float(omega), HAS_BIAS=bias is not None,
                                    EXACT=exact, PRECISION=dot_precision(x.dtype))
    return log_column_mass(w_part.sum(0), mx_part.amax(0)), change_part.sum()


def torch_reference(x, w, bias, lamb, rowmax, log_a, f, g, omega=1.0):
    """The same pass on the materialised matrix, through the plain torch backend."""
    from selflabel.backends.torch_ref import TorchBackend

    s = x.to(f.dtype) @ w.to(f.dtype).T + (0 if bias is None else bias.to(f.dtype))
    L = (lamb * (s - rowmax[:, None]))[None]
    f2 = f[None].clone()
    logw, change = TorchBackend().log_pass(L, log_a, f2, g[None], omega)
    f.copy_(f2[0])
    return logw[0], change[0]
