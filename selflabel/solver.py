"""The solver front: validation, dtype/device policy, the iteration loop, stopping
and the result. Backends (``selflabel.backends``) only run passes.

One iteration, scaling form (M = exp(lamb*(S - rowmax)), one read of M)::

    u = a / (M v)            w = M^T u            v = b / w

The column mass of the plan (u, v) before the v update is ``v * w``, so the
marginal error of a row-exact plan comes out of every pass for free; the solver
returns that plan (rows exact, columns within ``tol``). The log form does the same
with potentials f = log u, g = log v and log-sum-exps (see csrc/sinkhorn.cpp).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .accel import ACCELERATIONS, Relaxation, relaxed_step
from .backends import Backend, get_backend, resolve_device
from .backends.chunked import ChunkedBackend, ChunkedScores, rows_per_block
from .backends.implicit import FeatureScores, ImplicitTritonBackend
from .distributed import Reducer
from .result import SinkhornResult
from .source import check_float_dtype, make_source, parse_bytes

KINDS = ("logits", "log_probs", "probs")
ALGORITHMS = ("auto", "scaling", "log")
CRITERIA = ("marginal", "sela")
DEFAULT_TOL = {"marginal": 1e-5, "sela": 0.1}
PROBS_SUM_TOL = 1e-3  # |sum_j P_ij - 1| allowed for kind="probs"
MARGINAL_SUM_TOL = 1e-4  # marginals off by more than this are normalised with a warning
# The scaling form is taken only if every column keeps entries above exp(-T):
# then v stays within exp(T) and products u*M*v stay in range.
SCALING_SAFE_LOG = {torch.float32: 0.5 * math.log(torch.finfo(torch.float32).max),
                    torch.float64: 0.5 * math.log(torch.finfo(torch.float64).max)}
# Stabilised scaling (backends that absorb potentials): column scalings are kept within e^+-ABSORB_LOG
# of the absorbed kernel, whose rows have a maximum of 1, so products u * M * v stay far inside the range.
ABSORB_LOG = {torch.float32: 30.0, torch.float64: 300.0}


def _as_tensor(scores: Any, name: str = "scores") -> torch.Tensor:
    if isinstance(scores, (str, os.PathLike)):
        path = os.fspath(scores)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{name}: {path!r} is a directory; pass a .npy file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no such file {path!r}")
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(scores, np.ndarray):
        check_float_dtype(scores.dtype, name)
        if any(st < 0 for st in scores.strides):  # torch cannot view negative strides: copy
            scores = np.ascontiguousarray(scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: we never write to them
            return torch.from_numpy(scores)
    if isinstance(scores, torch.Tensor):
        check_float_dtype(scores.dtype, name)
        return scores.detach()
    if isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)) and len(scores) > 0:
        heads = [_as_tensor(s, f"{name}[{i}]") for i, s in enumerate(scores)]
        shapes = {tuple(h.shape) for h in heads}
        if len(shapes) != 1 or heads[0].dim() != 2:
            raise ValueError(f"{name}: a list of heads must hold (N, K) matrices of one shape, got {sorted(shapes)}")
        return torch.stack(heads)
    raise TypeError(f"{name} must be a torch.Tensor, numpy array, .npy path or list of heads, "
                    f"got {type(scores).__name__}")


def _compute_dtype(dtype: Any, scores: torch.Tensor) -> torch.dtype:
    if dtype is None:
        return torch.float64 if scores.dtype == torch.float64 else torch.float32
    aliases = {"float32": torch.float32, "f32": torch.float32, "float": torch.float32,
               "float64": torch.float64, "f64": torch.float64, "double": torch.float64,
               torch.float32: torch.float32, torch.float64: torch.float64,
               np.float32: torch.float32, np.float64: torch.float64}
    try:
        return aliases[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be float32 or float64 (or None to follow the scores), got {dtype!r}") from None


def _check_marginal(x: Any, n: int, name: str, length_name: str, device: torch.device) -> torch.Tensor | None:
    """Validate a marginal; float64, not yet normalised (None: uniform)."""
    if x is None:
        return None
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, device=device)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be numeric, got {t.dtype}")
    t = t.detach().to(torch.float64)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have shape ({n},) to match {length_name}={n}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (t <= 0).any():
        bad = int((t <= 0).nonzero()[0])
        raise ValueError(f"{name} must be strictly positive (entry {bad} is {float(t[bad])}); "
                         "drop zero-mass rows/clusters instead")
    return t


def _normalise(t: torch.Tensor, name: str, reducer: Reducer | None = None) -> torch.Tensor:
    """``t`` (float64) divided by its total (across ranks with a reducer), warning if that was off 1."""
    total_t = t.sum().reshape(1)
    total = float((reducer.sum_(total_t) if reducer is not None else total_t)[0])
    if abs(total - 1.0) > MARGINAL_SUM_TOL:
        warnings.warn(f"{name} sums to {total:.6g}, not 1; normalising it", UserWarning, stacklevel=3)
    return t / total


def _budget(memory_budget: int | str | None, device: torch.device) -> int:
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def _real(x: Any, name: str, hint: str) -> float:
    """A finite real number (Python, numpy or 0-d tensor), else ValueError naming ``name``."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool:
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be {hint}, got {x!r}")
    return float(x)


def _count(x: Any, name: str) -> int:
    """A positive integer (Python, numpy or 0-d integer tensor), else ValueError naming ``name``."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_floating_point and x.dtype != torch.bool:
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or int(x) < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def _check_options(lamb, kind, algorithm, criterion, acceleration, tol, max_iter,
                   check_every) -> tuple[float, float, int, int]:
    """Validated (lamb, tol, max_iter, check_every) as Python numbers."""
    lamb = _real(lamb, "lamb", "a positive finite number (SeLa uses 25)")
    if lamb <= 0:
        raise ValueError(f"lamb must be a positive finite number (SeLa uses 25), got {lamb!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    max_iter = _count(max_iter, "max_iter")
    check_every = _count(check_every, "check_every")
    hint = "a finite number >= 0 (0 runs exactly max_iter iterations)"
    tol = DEFAULT_TOL[criterion] if tol is None else _real(tol, "tol", hint)
    if tol < 0:
        raise ValueError(f"tol must be {hint}, got {tol!r}")
    return lamb, tol, max_iter, check_every


def probs_sum_tol(dtype: torch.dtype) -> float:
    """How far from 1 a row of probabilities stored in ``dtype`` may sum: 1e-3, or two
    machine epsilons of a coarser storage dtype (bfloat16 rounds each entry by up to 2**-9)."""
    return max(PROBS_SUM_TOL, 2 * torch.finfo(dtype).eps)


def _validate_prepared(prep, probs: bool, storage: torch.dtype, raw: torch.Tensor | None = None) -> None:
    """Raise on rows the solver cannot use. Logits may hold -inf (no mass) but not NaN or +inf."""
    bad = torch.isnan(prep.rowsum) | torch.isnan(prep.rowmax) | (prep.rowmax == math.inf)
    if probs:
        bad |= torch.isinf(prep.rowsum)
    if bad.any():
        h, i = (int(x) for x in bad.nonzero()[0])
        if raw is not None and raw.dtype != prep.rowmax.dtype and bool(torch.isfinite(raw[h, i]).all()):
            big = float(raw[h, i].abs().max())
            raise ValueError(f"scores: row {i} (head {h}) holds {big:.4g}, beyond the range of "
                             f"{prep.rowmax.dtype}; pass dtype=torch.float64 or rescale the scores")
        raise ValueError(f"scores contain NaN or +inf (row {i}, head {h}); clean the network outputs first "
                         "(-inf logits and zero probabilities are fine: they mean no mass)")
    if probs:
        if (prep.rowmin < 0).any():
            h, i = (int(x) for x in (prep.rowmin < 0).nonzero()[0])
            raise ValueError(f"scores: kind='probs' needs non-negative probabilities; row {i} (head {h}) has "
                             f"{float(prep.rowmin[h, i]):.4g}; pass kind='logits' for raw network outputs")
        tol = probs_sum_tol(storage)
        off = (prep.rowsum - 1).abs() > tol
        if off.any():
            h, i = (int(x) for x in off.nonzero()[0])
            raise ValueError(f"scores: kind='probs' needs rows summing to 1 (tolerance {tol:.3g} for {storage}); "
                             f"row {i} (head {h}) sums to {float(prep.rowsum[h, i]):.6g}; apply softmax or use "
                             "kind='logits'")
    else:
        empty = prep.rowmax == -math.inf
        if empty.any():
            h, i = (int(x) for x in empty.nonzero()[0])
            raise ValueError(f"scores: row {i} (head {h}) is -inf for every cluster, so that sample has no mass and "
                             "no balanced assignment exists; drop that row")


def _check_columns(colmax: torch.Tensor) -> None:
    dead = torch.isinf(colmax)
    if dead.any():
        h, j = (int(x) for x in dead.nonzero()[0])
        raise ValueError(f"scores: cluster {j} (head {h}) receives no mass from any sample (its score is -inf, "
                         "probability 0, or too far below every row's maximum to be represented), so no balanced "
                         "assignment exists; drop that cluster")


def _init_log_v(init: Any, H: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if init is None:
        return None
    log_v = init.log_v if isinstance(init, SinkhornResult) else torch.as_tensor(init)
    log_v = log_v.detach().to(device=device, dtype=dtype)
    if log_v.dim() == 1:
        log_v = log_v.expand(H, -1)
    if tuple(log_v.shape) != (H, K):
        raise ValueError(f"init must be a SinkhornResult or log_v of shape ({K},) or ({H}, {K}), "
                         f"got shape {tuple(log_v.shape)}")
    if not torch.isfinite(log_v).all():
        raise ValueError("init contains NaN or inf potentials")
    return log_v - log_v.amax(-1, keepdim=True)  # potentials are defined up to a constant


def _linear_marginal_ok(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a marginal (float64) keeps full precision in ``dtype`` in the scaling form."""
    info = torch.finfo(dtype)
    return float(x.min()) >= info.tiny / info.eps


def _log_marginal(x: torch.Tensor | None, n: int, total: int, dtype: torch.dtype, device: torch.device):
    """(linear, log) marginal in ``dtype``: the log is taken in float64, so every strictly
    positive entry has a finite log (the linear form may underflow: then the scaling
    form is not used)."""
    x64 = torch.full((n,), 1.0 / total, dtype=torch.float64, device=device) if x is None else x
    return x64, x64.to(dtype), torch.log(x64).to(dtype)


class _Loop:
    """The convergence loop shared by both algorithms, and the cross-rank failure protocol:
    a rank whose local work raises still joins the next collective with a failure flag, so
    every rank raises together instead of waiting for it."""

    def __init__(self, backend: Backend, reducer: Reducer, tol: float, max_iter: int, check_every: int,
                 criterion: str, bar: tqdm, relax: Relaxation) -> None:
        self.be, self.red, self.tol, self.max_iter, self.check_every = backend, reducer, tol, max_iter, check_every
        self.criterion, self.bar, self.relax = criterion, bar, relax
        self.history: list[tuple[int, float]] = []
        self.k = 0
        self.error = math.inf
        self.converged = False

    def due(self, k: int | None = None) -> bool:
        """Whether iteration ``k`` (default: the current one) ends at a check."""
        k = self.k if k is None else k
        if k == self.max_iter:
            return True
        if self.criterion == "sela":  # SeLa checks at its counters 0, 10, 20, ... (iterations 1, 11, ...)
            return k > 1 and (k - 1) % self.check_every == 0
        return k % self.check_every == 0

    def row_omega(self) -> float:
        """The relaxation factor of the current pass's row update: plain for a pass ending at a
        check, whose error must be that of a row-exact plan."""
        return self.relax.omega(self.due())

    def col_omega(self) -> float:
        """The relaxation factor of the column update after the current pass (asked after its check,
        so a new omega applies at once): plain with SeLa's rule in front of a check pass, so the rule
        measures one plain iteration's change of the row scalings."""
        return self.relax.omega(self.criterion == "sela" and self.due(self.k + 1))

    def local(self, fn, *args):
        """``fn(*args)`` and None, or (with a process group) None and the exception it raised."""
        if not self.red.active:
            return fn(*args), None
        try:
            return fn(*args), None
        except Exception as exc:  # raised on every rank by the next checked collective
            return None, exc

    def record(self, colmass: torch.Tensor, b: torch.Tensor, change: torch.Tensor) -> bool:
        """Record a check; return True when the loop must stop."""
        err = (colmass.double() - b.double()).abs().sum(-1)
        crit = self.red.sum_(change.clone()) if self.criterion == "sela" else err
        stats = torch.stack([err.max(), crit.max()]).cpu()  # the one host sync per check
        self.error, value = float(stats[0]), float(stats[1])
        self.history.append((self.k, value))
        self.relax.observe(self.k, self.error)
        self.bar.n = self.k
        self.bar.set_postfix(err=f"{self.error:.2e}")  # refreshes
        self.converged = self.tol > 0 and value <= self.tol
        return self.converged or self.k >= self.max_iter


def _flush_margin(tol: float, criterion: str, K: int) -> float:
    """log of the plan mass that kernel entries lost to the dtype's range may carry before the
    scaling form's answer must be checked exactly: small against tol and against one row's
    share of its best cluster (so labels cannot change either)."""
    share = 0.1 / K
    return math.log(min(share, 0.01 * tol) if criterion == "marginal" and tol > 0 else min(share, 1e-7))


class _Scaled(NamedTuple):
    """Where a run of scaling iterations stopped. Duals are totals (absorbed potentials included)."""

    log_u: torch.Tensor | None  # (H, N) row duals of the plan checked last (None: no good check yet)
    log_v: torch.Tensor  # (H, K) the column duals that plan was measured with
    resume: torch.Tensor  # (H, K) the column duals to go on from (the next iteration's)
    status: str  # "ended" (converged or max_iter), "overflow", "tripped" or "drifted"
    lost: float  # log of the bound on the plan mass of flushed kernel entries, at the last check


def _run_scaling(loop: _Loop, M, a, log_a, b, start, trip: float, n_total: int, absorbed=None,
                 drift: float = math.inf) -> _Scaled:
    """Scaling iterations on M = exp(log kernel + f_i + g_j) with ``absorbed`` = (f, g) potentials
    (None: none), from column scalings exp(``start``) (None: ones), until the loop ends
    ("ended"), a check finds non-finite or zero scalings ("overflow": the duals are the last good
    check's, loop.k its iteration), the bound on the mass of flushed kernel entries passes
    ``trip`` (log) at a check ("tripped"), or the next column scalings leave [e^-drift, e^drift]
    ("drifted": absorb them and go on)."""
    H, N, K = M.shape
    f_abs, g_abs = absorbed if absorbed is not None else (0.0, 0.0)
    u = a.repeat(H, 1)
    log_v = torch.zeros(H, K, dtype=M.dtype, device=M.device) if start is None else start
    v = torch.exp(log_v)  # may underflow to 0: then the first check fails and the log form starts from start
    # Entries of M below the smallest normal number are flushed to 0 (or lose precision): each is at
    # most exp(floor), so with the plan (u, v) they carry at most exp(floor) * u_i * sum_j v_j of row i,
    # a share exp(floor) * (u_i / a_i) * sum_j v_j of it. Every rank computes the same bound.
    floor = math.log(torch.finfo(M.dtype).tiny)
    good, good_k = _Scaled(None, g_abs + log_v, g_abs + log_v, "overflow", -math.inf), loop.k
    while loop.k < loop.max_iter:
        loop.k += 1
        out, err = loop.local(loop.be.scaling_pass, M, a, u, v, loop.row_omega())
        w, change = out if err is None else (torch.zeros(H, K, dtype=M.dtype, device=M.device), None)
        loop.red.sum_checked_(w, err)
        if loop.due():
            finite = torch.isfinite(w).all() & (w > 0).all() & torch.isfinite(u).all() & (u > 0).all()
            finite &= torch.isfinite(v).all() & (v > 0).all()
            row_ratio = (torch.log(u) - log_a).amax(-1)  # max_i log(u_i / a_i) per head
            stats = loop.red.max_(torch.cat([(~finite).to(torch.float64).reshape(1), row_ratio.double()])).cpu()
            if float(stats[0]) > 0:
                loop.k = good_k
                return good._replace(status="overflow")
            # plus products below the normal range flushed inside the passes: at most exp(floor) each,
            # K of them per row sum (a share exp(floor) K u_i / a_i of row i) and N per column sum
            log_v_sum = torch.logsumexp(torch.log(v.double()), -1).cpu()
            rows = stats[1:] + torch.logaddexp(log_v_sum, torch.full_like(log_v_sum, math.log(K)))
            lost = float(torch.logaddexp(rows, log_v_sum + math.log(n_total)).max()) + floor
            ended = loop.record(v * w, b, change)
            log_next = torch.log(b / w)
            good = _Scaled(f_abs + torch.log(u), g_abs + log_v, g_abs + log_next, "ended", lost)
            good_k = loop.k
            if ended:
                return good
            if float(log_next.abs().max()) > drift:  # absorbing first may settle the bound too
                return good._replace(status="drifted")
            if lost > trip:
                return good._replace(status="tripped")
        col_omega = loop.col_omega()
        if col_omega == 1.0:
            v = b / w
            log_v = torch.log(v)
        else:  # over-relaxed: log v += omega * log(b / column mass), where that still gains
            log_v = log_v + relaxed_step(torch.log(b / (v * w)), col_omega)
            v = torch.exp(log_v)
    return _Scaled(f_abs + torch.log(u), g_abs + log_v, g_abs + log_v, "ended", good.lost)


def _run_log(loop: _Loop, L, log_a, log_b, log_v0, log_u0=None, *, certify: bool = False):
    """Log-domain iterations. ``certify``: a single pass from ``log_v0`` whose check is the exact
    error of the returned duals (it does not count as an iteration)."""
    H, K = log_b.shape
    f = log_a.repeat(H, 1) if log_u0 is None else log_u0.clone()  # f only feeds the SeLa change
    g = torch.zeros(H, K, dtype=log_b.dtype, device=log_b.device) if log_v0 is None else log_v0.clone()
    while certify or loop.k < loop.max_iter:
        loop.k += not certify
        out, err = loop.local(loop.be.log_pass, L, log_a, f, g, 1.0 if certify else loop.row_omega())
        if err is not None:
            logw, change = torch.full((H, K), -math.inf, dtype=log_b.dtype, device=log_b.device), None
        else:
            logw, change = out
        logw = loop.red.logsumexp_checked_(logw, err)
        if certify or loop.due():
            bad = ~(torch.isfinite(logw).all() & torch.isfinite(f).all())
            if bool(loop.red.max_(bad.to(torch.float64).reshape(1))[0] > 0):
                raise FloatingPointError(
                    f"log-domain Sinkhorn produced non-finite potentials at iteration {loop.k}; "
                    "this is a bug, please report it with the scores' shape and lamb")
            if loop.record(torch.exp(logw.double()), torch.exp(log_b.double()), change) or certify:
                break
        g = g + relaxed_step(log_b - logw, loop.col_omega())
    return f, g


BACKENDS = ("auto", "cpu", "torch", "triton", "chunked")  # what sinkhorn_knopp's backend= accepts


@dataclass
class _Input:
    """The scores as the solver runs them: ``scores`` (dense (H, N, K) tensor in ``cdtype``, streamed or
    feature scores), the ``backend`` that runs them, and what the result reports."""

    scores: Any
    backend: Backend
    shape: tuple[int, int, int]
    stacked: bool  # given as (H, N, K): labels come back (H, N)
    device: torch.device
    storage: torch.dtype  # the dtype the scores were given in
    cdtype: torch.dtype  # the compute dtype
    raw3: torch.Tensor | None  # in-memory scores as given, (H, N, K), kept by the result for plan()


def _resolve_scores(scores: Any, backend: str, device: Any, dtype: Any, memory_budget: Any) -> _Input:
    """Every check of the scores and of the backend, device, dtype and budget asked for, once; the
    only place that picks a backend for ``sinkhorn_knopp``: implicit feature scores run on the fused
    Triton kernel, a budget or backend="chunked" streams row blocks, else ``get_backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    chunked = backend == "chunked" or (backend == "auto" and memory_budget is not None)
    if memory_budget is not None and not chunked:
        raise ValueError(f"memory_budget applies to backend='chunked' (or 'auto'), not backend={backend!r}")
    raw3 = None
    if isinstance(scores, FeatureScores):
        if device is not None and resolve_device(device, scores.device) != scores.device:
            raise ValueError(f"device={device!r}: implicit mode runs where the features are ({scores.device}); "
                             "move the features and prototypes instead")
        shape, stacked, device, storage = scores.shape, scores.stacked, scores.device, scores.x.dtype
        native = torch.float64 if scores.x.dtype == torch.float64 else torch.float32
        cdtype = torch.float64 if scores.x.dtype == torch.float64 else _compute_dtype(dtype, scores.w)
        if cdtype != native:
            raise ValueError("implicit mode computes in the features' precision: pass float64 features "
                             "for dtype=float64")
    elif chunked:
        src = make_source(scores)
        shape, stacked, storage = src.shape, src.ndim == 3, src.dtype
        device = resolve_device(device, scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu"))
        cdtype = _compute_dtype(dtype, torch.empty(0, dtype=src.dtype))
    else:
        raw = _as_tensor(scores)
        if device is not None:
            raw = raw.to(resolve_device(device, raw.device))
        if raw.dim() not in (2, 3):
            raise ValueError(f"scores must have shape (N, K) or (H, N, K), got {tuple(raw.shape)}")
        stacked = raw.dim() == 3
        raw3 = raw if stacked else raw.unsqueeze(0)
        shape, device, storage = raw3.shape, raw3.device, raw3.dtype
        cdtype = _compute_dtype(dtype, raw3)
    if 0 in tuple(shape):
        raise ValueError(f"scores must not be empty, got shape {tuple(shape)}")
    if isinstance(scores, FeatureScores):
        be, run = ImplicitTritonBackend(), scores
    elif chunked:
        be = ChunkedBackend(rows_per_block(src, cdtype, _budget(memory_budget, device)), device=device)
        run = ChunkedScores(src, cdtype)
    else:
        be, run = get_backend(backend, device), raw3.to(cdtype).contiguous()
    return _Input(run, be, tuple(shape), stacked, device, storage, cdtype, raw3)


@torch.no_grad()
def sinkhorn_knopp(
    scores: Any,
    *,
    lamb: float = 25.0,
    kind: str = "logits",
    row_marginal: Any = None,
    col_marginal: Any = None,
    dtype: Any = None,
    algorithm: str = "auto",
    backend: str = "auto",
    tol: float | None = None,
    max_iter: int = 1000,
    check_every: int = 10,
    criterion: str = "marginal",
    acceleration: str = "auto",
    init: Any = None,
    progress: bool = False,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    process_group: Any = None,
    gather_labels: bool = False,
) -> SinkhornResult:
    """Label N samples with K balanced clusters (SeLa's self-labelling step).

    Solves ``min_Q <Q, -S> - H(Q)/lamb`` subject to ``Q 1 = a`` and ``Q^T 1 = b`` by
    Sinkhorn-Knopp, and returns hard labels ``argmax_j Q_ij``.

    Args:
        scores: (N, K) scores, or (H, N, K) / a list of (N, K) for H heads solved together.
            A torch tensor (CPU or CUDA), numpy array, numpy memmap or ``.npy`` path; with
            backend="chunked" also a function returning row blocks.
            Never modified.
        lamb: sharpness (SeLa's lambda); the plan is ``exp(lamb * S)`` scaled.
        kind: "logits" or "log_probs" (the same to the solver: per-row shifts do not
            matter), or "probs" (rows summing to 1; enters as ``log P``).
        row_marginal: (N,) sample weights a, default uniform. Strictly positive;
            normalised to sum 1 (with a warning if it was off by more than 1e-4).
        col_marginal: (K,) cluster proportions b, default uniform (equipartition). Same rules.
        dtype: compute dtype, float32 or float64; default float64 for float64 scores,
            float32 otherwise.
        algorithm: "scaling" (fast: one multiply-add per entry), "log" (log-domain, stable
            for any lamb), or "auto": scaling when the dtype's range allows it, switching to
            the log form if the scaling form under- or overflows. Never returns NaN/inf.
        backend: "auto" ("cpu" for CPU tensors, "triton" for CUDA), "cpu" (fused C++),
            "triton" (fused Triton kernels), "chunked" (streamed from a file or array within
            ``memory_budget``), or "torch" (plain torch ops, any device).
        tol: stopping threshold. For criterion="marginal" the L1 violation of the column
            marginal of a row-exact plan (total mass 1), default 1e-5; for "sela" the
            summed relative change of the row scaling, default 0.1. 0 runs exactly
            ``max_iter`` iterations.
        max_iter: iteration cap.
        check_every: inspect the error every this many iterations (each check is one
            host-device sync on GPU; the error itself is a by-product of the pass).
        criterion: "marginal", or "sela" for SeLa's rule (checked at iterations 1 + m*check_every).
        acceleration: "auto" or "overrelax" (over-relaxed Sinkhorn-Knopp, ``selflabel.accel``:
            each update takes omega times its plain step where that still raises the dual
            objective, omega adapted from the errors measured at the checks; the same fixed
            point in fewer iterations), or "none" (plain Sinkhorn-Knopp). The row update of a
            pass ending at a check runs plain (and, with SeLa's rule, the column update in
            front of it), so ``check_every=1`` leaves only the column updates relaxed (with
            SeLa's rule, none).
        init: warm start: a previous ``SinkhornResult`` or its ``log_v`` ((K,) or (H, K)).
        progress: show a tqdm progress bar.
        memory_budget: bytes (or "512MB", "2GiB") for backend="chunked", which streams the
            scores in row blocks (one pass per iteration) and never holds the N x K matrix:
            for .npy files or memmaps larger than memory, or a function returning a fresh
            iterable of row blocks (called once per pass). With backend="auto", giving a
            budget selects "chunked". Default for "chunked": a quarter of physical memory
            (on CUDA: half of the free device memory). On CUDA the budget is device memory.
        device: where the passes run. Default: the scores' device (CPU for files, arrays
            and functions). ``"cuda"`` with backend="chunked" streams a host-resident
            matrix (file, array, pinned or plain CPU tensor) over PCIe in row blocks through
            pinned double buffers and a copy stream, computing with the Triton kernels, so
            a matrix larger than the GPU is solved on it. Other backends move in-memory
            scores to ``device`` first.
        process_group: a torch.distributed group (e.g. ``torch.distributed.group.WORLD``): each
            rank passes its own rows (any number, unequal shards allowed); the column side is
            global. One all_reduce of the (H, K) column sums per iteration (two in the log
            domain); stopping decisions are identical on every rank. Row marginals default
            to 1/N_total; a given row_marginal is this rank's shard, normalised globally.
            Bad input on any rank raises on every rank.
        gather_labels: with a process group, return the labels of all ranks' rows (in rank
            order) on every rank instead of this rank's only.

    Returns:
        SinkhornResult with ``labels`` (N,) or (H, N), duals, ``n_iter``, ``converged``,
        ``error``, ``history`` and ``seconds``.

    Raises:
        TypeError: non-floating scores or marginals.
        ValueError: bad shapes, NaN/inf scores, invalid probabilities, bad options.
        FloatingPointError: algorithm="scaling" under- or overflowed (use "auto" or "log").
    """
    t0 = time.perf_counter()
    red = Reducer(process_group)
    H = K = N = -1
    error: Exception | None = None
    cdtype, b_raw, log_v0 = None, None, None
    try:  # every local check; with a process group, errors are agreed on below so no rank hangs
        lamb, tol, max_iter, check_every = _check_options(lamb, kind, algorithm, criterion, acceleration, tol,
                                                          max_iter, check_every)
        inp = _resolve_scores(scores, backend, device, dtype, memory_budget)
        S, be, raw3, stacked, device, storage, cdtype = (inp.scores, inp.backend, inp.raw3, inp.stacked, inp.device,
                                                         inp.storage, inp.cdtype)
        H, N, K = inp.shape
        log_v0 = _init_log_v(init, H, K, cdtype, device)
        a_raw = _check_marginal(row_marginal, N, "row_marginal", "N", device)
        b_raw = _check_marginal(col_marginal, K, "col_marginal", "K", device)
        probs = kind == "probs"
        algo = "scaling" if algorithm in ("auto", "scaling") else "log"
        if be.log_only:
            if algorithm == "scaling":
                raise ValueError(f"backend {be.name!r} runs the log domain only; use algorithm='log' or 'auto'")
            algo = "log"
        prep = be.prepare(S, lamb, probs, exponentiate=algo == "scaling")
        _validate_prepared(prep, probs, storage, raw3)
    except Exception as exc:  # with a process group every failure must reach every rank
        if not red.active:
            raise
        error = exc
    # Every option that shapes the collectives or the answer must be the same on every rank.
    agreed = dict(dtype=cdtype, heads=H, K=K, lamb=lamb, kind=kind, algorithm=algorithm, tol=tol, max_iter=max_iter,
                  check_every=check_every, criterion=criterion, acceleration=acceleration, col_marginal=b_raw,
                  init=log_v0,
                  gather_labels=gather_labels) if red.active else {}
    n_total, row_offset = red.agree(error, N, agreed, row_marginal_given=row_marginal is not None)
    if n_total < K:
        warnings.warn(f"N={n_total} samples < K={K} clusters: hard labels cannot be balanced", UserWarning,
                      stacklevel=2)
    if a_raw is not None:
        a_raw = _normalise(a_raw, "row_marginal", red)
    if b_raw is not None:
        b_raw = _normalise(b_raw, "col_marginal")
    a64, a, log_a = _log_marginal(a_raw, N, n_total, cdtype, device)
    b64, b, log_b = _log_marginal(b_raw, K, K, cdtype, device)
    b, log_b = b.expand(H, K), log_b.expand(H, K)
    colmax = red.max_(prep.colmax.clone())
    _check_columns(colmax)
    if algo == "scaling":
        # In the scaling form a marginal entry below the dtype's normal range loses its precision.
        weak = [name for name, x in (("row_marginal", a64), ("col_marginal", b64))
                if not _linear_marginal_ok(x, cdtype)]
        any_weak = bool(red.max_(torch.tensor([float(bool(weak))], dtype=torch.float64))[0] > 0)
        # A backend that absorbs column potentials into its kernel starts nearly dead columns from
        # their best entry; the others need every column to keep an entry within the dtype's range.
        dying = not be.absorbs and float(colmax.min()) < -SCALING_SAFE_LOG[cdtype]
        unsafe_start = any_weak or dying
        if unsafe_start and algorithm == "scaling" and any_weak:
            raise ValueError(f"{' and '.join(weak) or 'another rank'}: entries this small lose their precision "
                             f"in the scaling form in {cdtype}; use algorithm='log' or 'auto', or dtype=torch.float64")
        if unsafe_start and algorithm == "auto":
            algo = "log"
            prep = None  # free the scaling kernel first
            prep = be.prepare(S, lamb, probs, exponentiate=False)
    rowmax = prep.rowmax

    switched_at, log_u0 = None, None
    kernel_is_log = iterate_log = algo == "log"  # what prep.mat holds; whether log iterations are to run
    # One bar for the solve: iterations and the error at the last check (no total: a solve stops at tol,
    # not at max_iter). Chunked passes advance it block by block.
    with tqdm(disable=not progress, desc=f"sinkhorn[{be.name}]", unit="it", leave=False) as bar:
        loop = _Loop(be, red, tol, max_iter, check_every, criterion, bar, Relaxation(acceleration != "none"))
        streamed = progress and hasattr(be, "advance")
        if streamed:
            be.advance = bar.update

        absorbed_g = None  # the column potentials absorbed into the scaling kernel, if any

        def prepare(log: bool, col_pot: torch.Tensor | None = None):
            """The log kernel, or the scaling kernel with ``col_pot`` absorbed; rebuilt only on change."""
            nonlocal prep, kernel_is_log, absorbed_g
            if kernel_is_log != log or (not log and col_pot is not absorbed_g):
                prep = None  # free the other kernel first
                if log or col_pot is None:
                    prep = be.prepare(S, lamb, probs, exponentiate=not log)
                else:
                    prep = be.prepare(S, lamb, probs, exponentiate=True, col_pot=col_pot)
                kernel_is_log, absorbed_g = log, None if log else col_pot
            return prep.mat

        def log_operand():
            """The log kernel for an exact pass: a view of the scores where the backend recomputes
            kernel rows itself (no new matrix), else the prepared log kernel."""
            view = None if kernel_is_log else be.log_view(prep, S, lamb, probs)
            return view if view is not None else prepare(log=True)

        if algo == "scaling":
            margin = _flush_margin(tol, criterion, K)
            keep_scaling = 0.25 * tol if criterion == "marginal" and tol > 0 else 1e-6  # row mass missed
            trip, target = (margin if algorithm == "auto" else math.inf), tol
            # Stabilised scaling: column potentials that would leave the dtype's comfortable range are
            # absorbed into the kernel (exp(L + f + g), rows of maximum 1) and the scalings restart at 1.
            absorbs = be.absorbs
            drift = ABSORB_LOG[cdtype] if absorbs else math.inf
            g_abs, start = None, log_v0
            if absorbs:
                total = torch.zeros(H, K, dtype=cdtype, device=device) if log_v0 is None else log_v0
                lifted = torch.maximum(total, -colmax - ABSORB_LOG[cdtype])  # every column keeps an entry
                if bool((lifted > total).any()) or float(total.min()) < -drift:
                    g_abs, start = lifted, total - lifted  # the same iterates, on a kernel whose columns all live
            while True:
                loop.tol = target
                mat = prepare(log=False, col_pot=g_abs)
                absorbed = (prep.row_pot, g_abs) if g_abs is not None else None
                state = _run_scaling(loop, mat, a, log_a, b, start, trip, n_total, absorbed, drift)
                loop.tol = tol
                log_u, log_v = state.log_u, state.log_v
                if state.status == "drifted":
                    g_abs, start = state.resume, None
                    continue
                if state.status == "overflow":
                    if algorithm == "scaling":
                        raise FloatingPointError(
                            f"the scaling form under/overflowed in {cdtype} after iteration {loop.k} (lamb={lamb} "
                            "is too sharp for this dtype); use algorithm='log' or 'auto', or dtype=torch.float64")
                    algo, switched_at, log_u0, log_v0 = "log", loop.k, state.log_u, state.resume
                    iterate_log = True
                    break
                if state.lost <= margin:  # flushed kernel entries cannot matter: the answer stands
                    break
                # Kernel entries below the dtype's range may carry plan mass at these duals: one exact
                # log-domain pass gives the true error of its (row-exact) duals, and the row mass missed.
                claimed, measured = loop.converged, loop.error
                log_u, log_v = _run_log(loop, log_operand(), log_a, log_b, state.log_v, state.log_u, certify=True)
                # Flushed entries only ever add mass, so exp(log u_scaling - log u_exact) - 1 >= 0 for them;
                # rounding differences between the two passes have either sign and average out.
                missed = float(red.sum_(torch.expm1((state.log_u - log_u).double()) @ a64).max())
                algo = "log"  # for now the duals are the exact pass's
                if loop.converged or loop.k >= max_iter:
                    break
                if missed > keep_scaling:  # the flushed entries matter: the scaling form cannot get there
                    if algorithm == "scaling":
                        raise FloatingPointError(
                            f"the scaling form reached tol on its {cdtype} kernel, but kernel entries below "
                            f"{cdtype}'s range carry mass at those duals: the exact marginal error is "
                            f"{loop.error:.3g}; use algorithm='log' or 'auto', or dtype=torch.float64")
                    switched_at, log_u0, log_v0, iterate_log = loop.k, log_u, log_v, True
                    break
                # The scaling form still iterates on (nearly) the exact kernel: go on, checking again once
                # the bound has grown by e^5 and at the end. If it claimed tol but the exact pass measured
                # more (float rounding of two measures), aim lower by the difference.
                algo = "scaling"
                start = state.resume if g_abs is None else state.resume - g_abs  # scalings relative to the kernel
                if absorbs and float(start.abs().max()) > drift:
                    g_abs, start = state.resume, None
                trip = state.lost + 5.0 if algorithm == "auto" else math.inf
                if claimed:
                    target = max(0.5 * tol, target - (loop.error - measured))
        if iterate_log:
            log_u, log_v = _run_log(loop, prepare(log=True), log_a, log_b, log_v0, log_u0)
        if algo == "log":
            label_mat, label_v = log_operand(), log_v
        else:  # the scaling kernel carries the absorbed column potentials
            label_mat, label_v = prep.mat, log_v if absorbed_g is None else log_v - absorbed_g
        labels, err = loop.local(be.labels, label_mat, label_v.contiguous(), algo == "scaling", row_offset)
        red.check(err)
        if gather_labels:
            labels = red.gather_rows(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    squeeze = (lambda t: t) if stacked else (lambda t: t[0])
    return SinkhornResult(
        labels=squeeze(labels), log_u=squeeze(log_u), log_v=squeeze(log_v), n_iter=loop.k,
        converged=loop.converged, error=loop.error, history=loop.history,
        seconds=time.perf_counter() - t0, algorithm=algo, backend=be.name, switched_at=switched_at,
        lamb=float(lamb), kind=kind, _scores=raw3, _rowmax=rowmax,
    )
