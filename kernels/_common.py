"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_configs(space: list[dict], warps: tuple[int, ...] = (4, 8)) -> list[triton.Config]:
    """Autotune configs: every dict of block sizes at every warp count."""
    return [triton.Config(c, num_warps=w) for c in space for w in warps]


def configs(gpu: list[triton.Config], interp: dict) -> list[triton.Config]:
    """Autotune configs: ``gpu`` on a GPU; under the CPU interpreter a single small config
    (autotuning there would only multiply the run time). Each kernel module keeps its GPU space
    importable as a module constant (``GPU_CONFIGS``...) even under the interpreter, for
    benchmarks/kernel_resources.py; its first config is the kernel's default (the one
    tests/test_kernel_compile.py compiles for sm_90a)."""
    if INTERPRET:
        return [triton.Config(interp, num_warps=1)]
    return gpu


def tiles(*entries: tuple[int, int, int]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_N, BLOCK_K, num_warps) triples."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in entries]


def union(*spaces: list[triton.Config]) -> list[triton.Config]:
    """The configs of several spaces, each once, in order: what the autotuner is given before pruning."""
    out: list[triton.Config] = []
    for space in spaces:
        out += [c for c in space if c not in out]
    return out


# A log-domain pass sums each column's mass exp(L + f + g) from its programs' partials; below this many
# times the dtype's smallest normal number that sum may be mostly flushed-to-zero terms, so the column's
# largest log-term stands in for its log. csrc/kernels.h's log pass applies the same rule.
UNDERFLOW_MARGIN = 1e8


def log_column_mass(w: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """log of the column masses ``w`` (summed partials), or the column maxima ``mx`` of the log-terms
    where ``w`` is within ``UNDERFLOW_MARGIN`` of underflow."""
    return torch.where(w > torch.finfo(w.dtype).tiny * UNDERFLOW_MARGIN, torch.log(w), mx)


@triton.jit
def relaxed_step(y, omega):
    """Over-relaxation of a dual update whose plain log step is ``y``: ``omega * y`` where that
    longer step still raises the dual objective, else ``y`` (the rule of ``selflabel.accel.relaxed_step``,
    there in float64, here in y's dtype; a gain that overflows to NaN counts as a loss)."""
    gain = omega * y * tl.exp(y) - tl.exp(omega * y) + 1.0
    return tl.where((y <= 0) | (gain >= 0), omega * y, y)


# The steps of the log-domain passes (kernels/logdomain.py, kernels/implicit.py). A row block's log-terms
# z = L + g come as [BLOCK_N, BLOCK_K] tiles (the resident pass: one [BLOCK_N, K_PAD] block) in the
# pass's dtype, masked entries -inf; r_i, s_i = max / sum-exp of row i. Row i's update is
# f_i = log a_i - r_i - log s_i, with weight alpha_i = a_i / s_i = exp(f_i + r_i): it adds
# alpha_i exp(z_ij - r_i) to column j's mass, a term whose log is z_ij + (log alpha_i - r_i).

@triton.jit
def online_lse(r, s, z):
    """One tile of a row-wise online log-sum-exp.

    r, s: [BLOCK_N] running row maxima and sums of exp(z - r) (start at -inf and 0);
    z: [BLOCK_N, BLOCK_K] the tile's log-terms, masked entries -inf; all of one float dtype.
    Returns the updated (r, s): the rows' log-sum-exp so far is r + log s."""
    r_new = tl.maximum(r, tl.max(z, axis=1))
    return r_new, s * tl.exp(r - r_new) + tl.sum(tl.exp(z - r_new[:, None]), axis=1)


@triton.jit
def update_row_potentials(F, rows, rmask, log_a, log_s, r, omega, change):
    """F[rows] <- log a - r - log s in place, over-relaxed from the old F[rows] (``relaxed_step``)
    when omega != 1.

    F: pointer to the head's row potentials, of the pass's dtype; rows, rmask: [BLOCK_N] int32
    row indices and int1 the rows that exist; log_a, log_s, r: [BLOCK_N] in the pass's dtype;
    omega: scalar of that dtype; change: [BLOCK_N] float64, the running sum of |exp(f_old - f) - 1|.
    Returns [BLOCK_N] (alpha, shift, change): the column-mass weight alpha = exp(f + r) of the new f
    (0 on masked rows); shift = log alpha - r (-inf on masked rows), the log of exactly that weight,
    so that ``column_max`` is the log of the largest term ``column_mass`` adds (f itself would
    differ from it by a rounding when over-relaxed); change with these rows added."""
    log_alpha = log_a - log_s
    f_new = log_alpha - r
    f_old = tl.load(F + rows, mask=rmask, other=0.0)
    if omega != 1.0:  # over-relaxed; alpha = exp(f + r) follows it
        f_new = f_old + relaxed_step(f_new - f_old, omega)
        log_alpha = f_new + r
    change += tl.where(rmask, tl.abs(tl.exp(f_old.to(tl.float64) - f_new.to(tl.float64)) - 1.0), 0.0)
    tl.store(F + rows, f_new, mask=rmask)
    alpha = tl.where(rmask, tl.exp(log_alpha), 0.0)
    shift = tl.where(rmask, log_alpha - r, float("-inf"))
    return alpha, shift, change


@triton.jit
def column_mass(alpha, z, r):
    """A tile's column sums sum_i alpha_i exp(z_ij - r_i), [BLOCK_K] (every exp <= 1).

    alpha, r: [BLOCK_N] the row weights (``update_row_potentials``) and row maxima;
    z: [BLOCK_N, BLOCK_K] the log-terms; one float dtype."""
    return tl.sum(alpha[:, None] * tl.exp(z - r[:, None]), axis=0)


@triton.jit
def column_max(z, shift):
    """A tile's column maxima max_i z_ij + shift_i, [BLOCK_K]: the log of each column's largest
    term in ``column_mass``.

    z: [BLOCK_N, BLOCK_K] the log-terms; shift: [BLOCK_N] from ``update_row_potentials``."""
    return tl.max(z + shift[:, None], axis=0)


@triton.jit
def add_column_partials(W_PART, MX_PART, poff, cols, cmask, w, mx):
    """W_PART[poff + cols] += w and MX_PART[poff + cols] = max(MX_PART[poff + cols], mx), where cmask.

    W_PART, MX_PART: pointers to the column partials (sums, maxima), of w's dtype; poff: int64 offset
    of the program's partials; cols, cmask: [BLOCK_K] int32 columns and int1 the columns that exist;
    w, mx: [BLOCK_K] from ``column_mass`` and ``column_max``."""
    tl.store(W_PART + poff + cols, tl.load(W_PART + poff + cols, mask=cmask, other=0.0) + w, mask=cmask)
    old = tl.load(MX_PART + poff + cols, mask=cmask, other=float("-inf"))
    tl.store(MX_PART + poff + cols, tl.maximum(old, mx), mask=cmask)


def prune_by_vec(configs_for, matrix: str):
    """An ``early_config_prune`` keeping the configs ``configs_for(element_size, VEC)`` names for the
    launch's matrix argument ``matrix`` (what compiles without spills depends on the load width)."""

    def prune(cfgs, nargs, **kwargs):
        keep = configs_for(nargs[matrix].element_size(), kwargs["VEC"])
        return [c for c in cfgs if c in keep]

    return prune


def max_programs(device: torch.device) -> int:
    """Persistent-grid size: a few programs per SM, each owning one column partial."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def vector_width(K: int, element_size: int) -> int:
    """The most elements (up to 16 bytes) that divide K: every row of a contiguous (.., K) matrix
    then starts on that boundary, and the kernels read it in vector loads of that width."""
    vec = 16 // element_size
    while K % vec:
        vec //= 2
    return vec


def check_tensors(kernel: str, dtypes: tuple[torch.dtype, ...], **tensors: tuple[torch.Tensor, tuple[int, ...]]):
    """What the kernels assume of their tensors, checked before a launch (they index every tensor as
    a dense row-major array with 32-bit column offsets): each ``name=(tensor, shape)`` is a tensor of
    exactly that shape, contiguous, of the first tensor's dtype (one of ``dtypes``), on its device.
    Raises ValueError naming the kernel and the argument."""
    first = next(iter(tensors.values()))[0]
    if first.dtype not in dtypes:
        allowed = str(dtypes[0]) if len(dtypes) == 1 else "one of " + ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{kernel}: {next(iter(tensors))} must be {allowed}, got {first.dtype}")
    for name, (t, shape) in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{kernel}: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{kernel}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise ValueError(f"{kernel}: {name} must be {first.dtype} like the matrix, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{kernel}: {name} is on {t.device}, the matrix on {first.device}")
        if not t.is_contiguous():
            raise ValueError(f"{kernel}: {name} must be contiguous (strides {t.stride()} for shape "
                             f"{tuple(t.shape)}); pass {name}.contiguous()")
    if any(s == 0 for s in first.shape):
        raise ValueError(f"{kernel}: empty matrix of shape {tuple(first.shape)}")
    if first.shape[-1] >= 2**31:
        raise ValueError(f"{kernel}: K = {first.shape[-1]} columns do not fit the kernels' 32-bit column index")
