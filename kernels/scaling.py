"""Fused scaling-form Sinkhorn iteration: u <- a / (M v) and w = M^T u from ONE read of M.

Shapes: M (H, N, K), A (N,), U (H, N), V (H, K), float32 or float64, contiguous (the launcher
checks); W_PART (H, P, K) column partials in M's dtype, CHANGE_PART (H, P) float64. Program
(p, h) owns the row blocks p, p + P, ... of head h, the column partial W_PART[h, p, :] and
CHANGE_PART[h, p] = sum |u_old/u_new - 1| over its rows. The host sums the partials
(deterministic: a fixed reduction order, no atomics). Two kernels, by the length of a row:

- ``_scaling_resident_kernel``, rows of at most RESIDENT_BYTES (32 KiB: K <= 8192 in float32,
  4096 in float64): a row block (BLOCK_N x K_PAD, K_PAD the power of two >= K) is loaded into
  registers once; t = M_blk v, u_blk = a_blk / t and the column sums M_blk^T u_blk are all
  computed from those registers, the column sums into a K_PAD accumulator that stays in registers
  across the program's blocks. Each element of M is loaded from global memory once per iteration
  (benchmarks/kernel_resources.py checks that on the compiled PTX).
- ``_scaling_stream_kernel``, longer rows: the row block in BLOCK_K column tiles, twice (t, then
  the column sums). The second sweep re-reads the block, from L2 if it is still there.

VEC (vector_width: the most elements, up to 16 bytes, that divide K) tells the compiler that every
row starts on a VEC boundary, so M is read in VEC-wide vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    check_tensors,
    configs,
    gpu_configs,
    max_programs,
    prune_by_vec,
    relaxed_step,
    tiles,
    union,
    vector_width,
)

# Rows up to this many bytes go through the resident kernel (one global read of M). Under the CPU
# interpreter only rows up to 256 bytes do, so that the CPU tests (K <= 70) run both kernels.
RESIDENT_BYTES = 256 if INTERPRET else 32 * 1024
# The resident kernel holds THREAD_BYTES of M per thread (half that with scalar 4-byte loads, whose
# addresses take two registers per element): BLOCK_N = that * threads / row bytes, at least one row.
# Measured (benchmarks/results/kernel-resources.json, sm_80 and sm_90a): 128 bytes per thread
# compiles to 120-250 registers without spills; 256 bytes, or 128 bytes in scalar float32 loads,
# spill. 16 warps are left out: at 512 threads a thread gets at most 128 registers, and the log
# pass spilled there. Configs where one row alone exceeds the budget are pruned.
RESIDENT_CONFIGS = gpu_configs([{"THREAD_BYTES": 128}, {"THREAD_BYTES": 64}], warps=(8, 4))
# Streaming kernel (rows longer than RESIDENT_BYTES): BLOCK_N x BLOCK_K tiles. Of (16, 32, 64) x (128, 256,
# 512) x (4, 8 warps), these compile without spills with 16-byte loads of float32 on sm_80 and sm_90a (the
# over-relaxed update included); pruned for spilling: 16 x 256 at 4 warps, 16 x 512 at 8 warps, 32 x 256
# and 32 x 512, 64 x 128 at 4 warps, 64 x 256 and 64 x 512.
GPU_CONFIGS = tiles((16, 128, 8), (16, 128, 4), (16, 256, 8), (16, 512, 4), (32, 128, 8), (32, 128, 4),
                    (64, 128, 8))
# Other load widths spill elsewhere and keep these (benchmarks/results/kernel-resources.json, K = 30000 to
# 30002): float64 in 16-byte loads spilled at 16 x 128 and 16 x 512 / 4 warps, 32 x 128 / 4 warps and
# 64 x 128 (16-276 B); odd K (scalar loads) in float32 at 16 x 128 and 16 x 256 / 4 warps, 16 x 128 / 8
# warps (4-8 B), in float64 at 16 x 512 / 4 warps and 32 x 128 / 8 warps (20-240 B); float32 in 8-byte
# loads (K = 2 mod 4) at 16 x 128 / 8 warps, 16 x 256 and 32 x 128 / 8 warps. Keyed by (element size, VEC).
NARROW_CONFIGS = {(8, 2): tiles((16, 128, 8), (16, 256, 8), (16, 256, 4), (32, 128, 8)),
                  (4, 1): tiles((16, 256, 8), (16, 512, 4), (32, 128, 8)),
                  (8, 1): tiles((16, 128, 8), (16, 128, 4), (16, 256, 8), (16, 256, 4)),
                  (4, 2): tiles((16, 128, 4), (16, 512, 4), (32, 128, 4), (64, 128, 8))}


def stream_configs(element_size: int, vec: int) -> list[triton.Config]:
    """The streaming kernel's configs for a matrix of this element size read in VEC-wide loads."""
    return NARROW_CONFIGS.get((element_size, vec), GPU_CONFIGS)


def resident(K: int, element_size: int) -> bool:
    """Whether a row of K elements goes through the resident (one-read) kernel."""
    return triton.next_power_of_2(K) * element_size <= RESIDENT_BYTES


def _budget(thread_bytes: int, element_size: int, vec: int) -> int:
    return thread_bytes if vec * element_size >= 8 else thread_bytes // 2


def resident_block_n(thread_bytes: int, num_warps: int, k_pad: int, element_size: int, vec: int) -> int:
    """Rows per block of the resident kernel: the thread budget times the threads, at least one row."""
    return max(1, _budget(thread_bytes, element_size, vec) * 32 * num_warps // (k_pad * element_size))


def resident_configs(k_pad: int, element_size: int, vec: int, space: list | None = None) -> list:
    """The resident configs that hold one row within their thread budget (the first is the default);
    if none does, the one with the largest budget."""
    space = RESIDENT_CONFIGS if space is None else space

    def room(c):
        return _budget(c.kwargs["THREAD_BYTES"], element_size, vec) * 32 * c.num_warps

    return [c for c in space if k_pad * element_size <= room(c)] or [max(space, key=room)]


def prune_resident(matrix: str):
    """An ``early_config_prune`` for a resident kernel whose matrix argument is ``matrix``."""

    def prune(cfgs, nargs, **kwargs):
        return resident_configs(kwargs["K_PAD"], nargs[matrix].element_size(), kwargs["VEC"], cfgs)

    return prune


@triton.autotune(
    configs=configs(RESIDENT_CONFIGS, {"THREAD_BYTES": 16}),
    key=["K"],
    prune_configs_by={"early_config_prune": prune_resident("M")},
    restore_value=["U"],
)
@triton.heuristics({"BLOCK_N": lambda a: resident_block_n(a["THREAD_BYTES"], a["num_warps"], a["K_PAD"],
                                                          a["M"].element_size(), a["VEC"])})
@triton.jit
def _scaling_resident_kernel(M, A, U, V, W_PART, CHANGE_PART, NPROG, N, K, OMEGA: tl.float64, VEC: tl.constexpr,
                             K_PAD: tl.constexpr, THREAD_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = M.dtype.element_ty
    omega = tl.full([], OMEGA, dt)  # OMEGA arrives in float64; the relaxation runs in dt
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    base = h.to(tl.int64) * N * KS
    urow = h.to(tl.int64) * N
    cols = tl.arange(0, K_PAD)
    cmask = cols < KS
    v = tl.load(V + h * KS + cols, mask=cmask, other=0.0)
    acc = tl.zeros([K_PAD], dt)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, tl.cdiv(N, BLOCK_N), NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        m = tl.load(M + base + rows.to(tl.int64)[:, None] * KS + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        t = tl.sum(m * v[None, :], axis=1)
        a = tl.load(A + rows, mask=rmask, other=1.0)
        u_old = tl.load(U + urow + rows, mask=rmask, other=1.0)
        u = a / tl.where(rmask, t, 1.0)
        if omega != 1.0:  # over-relaxed
            u = u_old * tl.exp(relaxed_step(tl.log(u / u_old), omega))
        change += tl.where(rmask, tl.abs(u_old.to(tl.float64) / u.to(tl.float64) - 1.0), 0.0)
        tl.store(U + urow + rows, u, mask=rmask)
        acc += tl.sum(m * tl.where(rmask, u, 0.0)[:, None], axis=0)
    tl.store(W_PART + (h * NPROG + pid).to(tl.int64) * KS + cols, acc, mask=cmask)
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


@triton.autotune(
    configs=configs(union(GPU_CONFIGS, *NARROW_CONFIGS.values()), {"BLOCK_N": 4, "BLOCK_K": 32}),
    key=["K"],
    prune_configs_by={"early_config_prune": prune_by_vec(stream_configs, "M")},
    reset_to_zero=["W_PART", "CHANGE_PART"],
    restore_value=["U"],
)
@triton.jit
def _scaling_stream_kernel(M, A, U, V, W_PART, CHANGE_PART, NPROG, N, K, OMEGA: tl.float64, VEC: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    dt = M.dtype.element_ty
    omega = tl.full([], OMEGA, dt)  # OMEGA arrives in float64; the relaxation runs in dt
    KS = (K // VEC) * VEC  # == K: every row starts on a VEC boundary (vector loads)
    base = h.to(tl.int64) * N * KS
    urow = h.to(tl.int64) * N
    part = W_PART + (h * NPROG + pid).to(tl.int64) * KS
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    change = tl.zeros([BLOCK_N], tl.float64)
    for blk in tl.range(pid, n_blocks, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        roff = base + rows.to(tl.int64)[:, None] * KS
        t = tl.zeros([BLOCK_N], dt)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < KS
            m = tl.load(M + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            v = tl.load(V + h * KS + cols, mask=cmask, other=0.0)
            t += tl.sum(m * v[None, :], axis=1)
        a = tl.load(A + rows, mask=rmask, other=1.0)
        u_old = tl.load(U + urow + rows, mask=rmask, other=1.0)
        u = a / tl.where(rmask, t, 1.0)
        if omega != 1.0:  # over-relaxed
            u = u_old * tl.exp(relaxed_step(tl.log(u / u_old), omega))
        change += tl.where(rmask, tl.abs(u_old.to(tl.float64) / u.to(tl.float64) - 1.0), 0.0)
        tl.store(U + urow + rows, u, mask=rmask)
        u = tl.where(rmask, u, 0.0)
        for k0 in range(0, KS, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < KS
            m = tl.load(M + roff + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            w = tl.sum(m * u[:, None], axis=0)
            tl.store(part + cols, tl.load(part + cols, mask=cmask, other=0.0) + w, mask=cmask)
    tl.store(CHANGE_PART + h * NPROG + pid, tl.sum(change, axis=0))


def scaling_pass(M: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor, omega: float = 1.0):
    """u <- a / (M v) in place, over-relaxed per row by ``omega`` (``selflabel.accel``); returns
    (w = M^T u (H, K), sum |u_old/u_new - 1| (H,) float64)."""
    H, N, K = M.shape
    check_tensors("scaling_pass", (torch.float32, torch.float64), M=(M, (H, N, K)), a=(a, (N,)), u=(u, (H, N)),
                  v=(v, (H, K)))
    P = min(max_programs(M.device), N)
    vec = vector_width(K, M.element_size())
    change_part = torch.zeros(H, P, dtype=torch.float64, device=M.device)
    if resident(K, M.element_size()):
        w_part = torch.empty(H, P, K, dtype=M.dtype, device=M.device)  # every program writes its row
        _scaling_resident_kernel[(P, H)](M, a, u, v, w_part, change_part, P, N, K, float(omega), VEC=vec,
                                         K_PAD=triton.next_power_of_2(K))
    else:
        w_part = torch.zeros(H, P, K, dtype=M.dtype, device=M.device)
        _scaling_stream_kernel[(P, H)](M, a, u, v, w_part, change_part, P, N, K, float(omega), VEC=vec)
    return w_part.sum(1), change_part.sum(1)


def torch_reference(M, a, u, v, omega=1.0):
    from selflabel.backends.torch_ref import TorchBackend

    return TorchBackend().scaling_pass(M, a, u, v, omega)
