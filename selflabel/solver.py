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
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends import Backend, get_backend, resolve_device
from .backends.chunked import ChunkedBackend, ChunkedScores, rows_per_block
from .backends.implicit import FeatureScores, ImplicitTritonBackend
from .distributed import Reducer
from .result import SinkhornResult
from .source import make_source, parse_bytes

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


def _as_tensor(scores: Any, name: str = "scores") -> torch.Tensor:
    if isinstance(scores, (str, os.PathLike)):
        path = os.fspath(scores)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no such file {path!r}")
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(scores, np.ndarray):
        if scores.dtype.kind not in "f":
            raise TypeError(f"{name} must hold floating-point values, got numpy dtype {scores.dtype}; "
                            "cast it, e.g. scores.astype(np.float32)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: we never write to them
            return torch.from_numpy(scores)
    if isinstance(scores, torch.Tensor):
        return scores
    if isinstance(scores, Sequence) and len(scores) > 0:
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
    t = torch.as_tensor(x, device=device)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be numeric, got {t.dtype}")
    t = t.to(torch.float64)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have shape ({n},) to match {length_name}={n}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (t <= 0).any():
        bad = int((t <= 0).nonzero()[0])
        raise ValueError(f"{name} must be strictly positive (entry {bad} is {float(t[bad])}); "
                         "drop zero-mass rows/clusters instead")
    return t


def _normalise(t: torch.Tensor, name: str, dtype: torch.dtype, reducer: Reducer | None = None) -> torch.Tensor:
    """``t`` divided by its total (across ranks with a reducer), warning if that was off 1."""
    total_t = t.sum().reshape(1)
    total = float((reducer.sum_(total_t) if reducer is not None else total_t)[0])
    if abs(total - 1.0) > MARGINAL_SUM_TOL:
        warnings.warn(f"{name} sums to {total:.6g}, not 1; normalising it", UserWarning, stacklevel=3)
    return (t / total).to(dtype)


def _budget(memory_budget: int | str | None, device: torch.device) -> int:
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def _check_options(lamb, kind, algorithm, criterion, tol, max_iter, check_every) -> float:
    if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not math.isfinite(lamb) or lamb <= 0:
        raise ValueError(f"lamb must be a positive finite number (SeLa uses 25), got {lamb!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    tol = DEFAULT_TOL[criterion] if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0 (0 runs exactly max_iter iterations), got {tol!r}")
    return float(tol)


def _validate_prepared(prep, probs: bool) -> None:
    bad = ~(torch.isfinite(prep.rowsum) & torch.isfinite(prep.rowmax))
    if probs:
        bad |= prep.rowmin < 0
    if bad.any():
        h, i = (int(x) for x in bad.nonzero()[0])
        if probs and prep.rowmin[h, i] < 0:
            raise ValueError(f"scores: kind='probs' needs non-negative probabilities; row {i} (head {h}) has "
                             f"{float(prep.rowmin[h, i]):.4g}; pass kind='logits' for raw network outputs")
        raise ValueError(f"scores contain NaN or inf (row {i}, head {h}); clean the network outputs first")
    if probs:
        off = (prep.rowsum - 1).abs() > PROBS_SUM_TOL
        if off.any():
            h, i = (int(x) for x in off.nonzero()[0])
            raise ValueError(f"scores: kind='probs' needs rows summing to 1 (tolerance {PROBS_SUM_TOL}); row {i} "
                             f"(head {h}) sums to {float(prep.rowsum[h, i]):.6g}; apply softmax or use kind='logits'")


def _check_columns(colmax: torch.Tensor) -> None:
    dead = torch.isinf(colmax)
    if dead.any():
        h, j = (int(x) for x in dead.nonzero()[0])
        raise ValueError(f"scores: cluster {j} (head {h}) has probability 0 for every sample, so no balanced "
                         "assignment exists; drop that cluster")


def _init_log_v(init: Any, H: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if init is None:
        return None
    log_v = init.log_v if isinstance(init, SinkhornResult) else torch.as_tensor(init)
    log_v = log_v.to(device=device, dtype=dtype)
    if log_v.dim() == 1:
        log_v = log_v.expand(H, -1)
    if tuple(log_v.shape) != (H, K):
        raise ValueError(f"init must be a SinkhornResult or log_v of shape ({K},) or ({H}, {K}), "
                         f"got shape {tuple(log_v.shape)}")
    if not torch.isfinite(log_v).all():
        raise ValueError("init contains NaN or inf potentials")
    return log_v - log_v.amax(-1, keepdim=True)  # potentials are defined up to a constant


class _Loop:
    """The convergence loop shared by both algorithms."""

    def __init__(self, backend: Backend, reducer: Reducer, tol: float, max_iter: int, check_every: int,
                 criterion: str, bar: tqdm) -> None:
        self.be, self.red, self.tol, self.max_iter, self.check_every = backend, reducer, tol, max_iter, check_every
        self.criterion, self.bar = criterion, bar
        self.history: list[tuple[int, float]] = []
        self.k = 0
        self.error = math.inf
        self.converged = False

    def due(self) -> bool:
        if self.k == self.max_iter:
            return True
        if self.criterion == "sela":  # SeLa checks at its counters 0, 10, 20, ... (iterations 1, 11, ...)
            return self.k > 1 and (self.k - 1) % self.check_every == 0
        return self.k % self.check_every == 0

    def record(self, colmass: torch.Tensor, b: torch.Tensor, change: torch.Tensor) -> bool:
        """Record a check; return True when the loop must stop."""
        err = (colmass - b).abs().sum(-1).double()
        crit = self.red.sum_(change.clone()) if self.criterion == "sela" else err
        stats = torch.stack([err.max(), crit.max()]).cpu()  # the one host sync per check
        self.error, value = float(stats[0]), float(stats[1])
        self.history.append((self.k, value))
        self.bar.update(self.k - self.bar.n)
        self.bar.set_postfix(err=f"{self.error:.2e}")
        self.converged = self.tol > 0 and value <= self.tol
        return self.converged or self.k >= self.max_iter


def _run_scaling(loop: _Loop, M, a, b, log_v0):
    H, N, K = M.shape
    u = a.repeat(H, 1)
    log_v = torch.zeros(H, K, dtype=M.dtype, device=M.device) if log_v0 is None else log_v0
    v = torch.exp(log_v)  # may underflow to 0: then the first check fails and the log form starts from log_v0
    good_log_u, good_log_v, good_k = None, log_v, 0
    while loop.k < loop.max_iter:
        loop.k += 1
        w, change = loop.be.scaling_pass(M, a, u, v)
        loop.red.sum_(w)
        if loop.due():
            bad = ~(torch.isfinite(w).all() & (w > 0).all() & torch.isfinite(u).all() & (u > 0).all())
            if bool(loop.red.max_(bad.to(M.dtype).reshape(1))[0] > 0):
                loop.k = good_k  # the caller resumes from the last good state
                return good_log_u, good_log_v, False
            if loop.record(v * w, b, change):
                break
            good_log_u, good_log_v, good_k = torch.log(u), torch.log(b / w), loop.k  # resume at k + 1
        v = b / w
    return torch.log(u), torch.log(v), True


def _run_log(loop: _Loop, L, log_a, log_b, log_v0, log_u0=None):
    H, N, K = L.shape
    f = log_a.repeat(H, 1) if log_u0 is None else log_u0.clone()  # f only feeds the SeLa change
    g = torch.zeros(H, K, dtype=L.dtype, device=L.device) if log_v0 is None else log_v0.clone()
    while loop.k < loop.max_iter:
        loop.k += 1
        logw, change = loop.be.log_pass(L, log_a, f, g)
        logw = loop.red.logsumexp_(logw)
        if loop.due():
            bad = ~(torch.isfinite(logw).all() & torch.isfinite(f).all())
            if bool(loop.red.max_(bad.to(L.dtype).reshape(1))[0] > 0):
                raise FloatingPointError(
                    f"log-domain Sinkhorn produced non-finite potentials at iteration {loop.k}; "
                    "this is a bug, please report it with the scores' shape and lamb")
            if loop.record(torch.exp(logw), torch.exp(log_b), change):
                break
        g = g + (log_b - logw)
    return f, g


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
    try:  # every local check; with a process group, errors are agreed on below so no rank hangs
        tol = _check_options(lamb, kind, algorithm, criterion, tol, max_iter, check_every)
        chunked = backend == "chunked" or (backend == "auto" and memory_budget is not None)
        if memory_budget is not None and not chunked:
            raise ValueError(f"memory_budget applies to backend='chunked' (or 'auto'), not backend={backend!r}")
        implicit = isinstance(scores, FeatureScores)
        if implicit:
            if device is not None and resolve_device(device, scores.device) != scores.device:
                raise ValueError(f"device={device!r}: implicit mode runs where the features are ({scores.device}); "
                                 "move the features and prototypes instead")
            raw3 = None  # recomputed from features in every pass, never stored
            shape, stacked, device = scores.shape, scores.stacked, scores.device
            cdtype = torch.float64 if scores.x.dtype == torch.float64 else _compute_dtype(dtype, scores.w)
            if cdtype != (torch.float64 if scores.x.dtype == torch.float64 else torch.float32):
                raise ValueError("implicit mode computes in the features' precision: pass float64 features "
                                 "for dtype=float64")
        elif chunked:
            src = make_source(scores)
            raw3 = None  # never loaded whole
            shape, stacked = src.shape, src.ndim == 3
            device = resolve_device(device, scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu"))
            cdtype = _compute_dtype(dtype, torch.empty(0, dtype=src.dtype))
        else:
            raw = _as_tensor(scores)
            if device is not None:
                raw = raw.to(resolve_device(device, raw.device))
            if not raw.dtype.is_floating_point:
                raise TypeError(f"scores must be floating point, got {raw.dtype}; cast with .float()")
            if raw.dim() not in (2, 3):
                raise ValueError(f"scores must have shape (N, K) or (H, N, K), got {tuple(raw.shape)}")
            stacked = raw.dim() == 3
            raw3 = raw if stacked else raw.unsqueeze(0)
            shape, device = raw3.shape, raw3.device
            cdtype = _compute_dtype(dtype, raw3)
        H, N, K = shape
        if H == 0 or N == 0 or K == 0:
            raise ValueError(f"scores must not be empty, got shape {tuple(shape)}")
        if implicit:
            be = ImplicitTritonBackend()
            S = scores
        elif chunked:
            be = ChunkedBackend(rows_per_block(src, cdtype, _budget(memory_budget, device)), progress=progress,
                                device=device)
            S = ChunkedScores(src, cdtype)
        else:
            be = get_backend(backend, device)
            S = raw3.to(cdtype).contiguous()
        log_v0 = _init_log_v(init, H, K, cdtype, device)
        a_raw = _check_marginal(row_marginal, N, "row_marginal", "N", device)
        b_raw = _check_marginal(col_marginal, K, "col_marginal", "K", device)
        probs = kind == "probs"
        algo = "scaling" if algorithm in ("auto", "scaling") else "log"
        if getattr(be, "log_only", False):
            if algorithm == "scaling":
                raise ValueError(f"backend {be.name!r} runs the log domain only; use algorithm='log' or 'auto'")
            algo = "log"
        prep = be.prepare(S, lamb, probs, exponentiate=algo == "scaling")
        _validate_prepared(prep, probs)
    except Exception as exc:  # with a process group every failure must reach every rank
        if not red.active:
            raise
        error = exc
    n_total = red.agree(error, H, K, N, row_marginal_given=row_marginal is not None)
    if n_total < K:
        warnings.warn(f"N={n_total} samples < K={K} clusters: hard labels cannot be balanced", UserWarning,
                      stacklevel=2)
    if a_raw is None:
        a = torch.full((N,), 1.0 / n_total, dtype=cdtype, device=device)
    else:
        a = _normalise(a_raw, "row_marginal", cdtype, red)
    b = (torch.full((K,), 1.0 / K, dtype=cdtype, device=device) if b_raw is None
         else _normalise(b_raw, "col_marginal", cdtype)).expand(H, K)
    colmax = red.max_(prep.colmax.clone())
    _check_columns(colmax)
    if algo == "scaling" and algorithm == "auto" and float(colmax.min()) < -SCALING_SAFE_LOG[cdtype]:
        algo = "log"
        prep = be.prepare(S, lamb, probs, exponentiate=False)
    rowmax = prep.rowmax

    switched_at, log_u0 = None, None
    with tqdm(total=max_iter, disable=not progress, desc=f"sinkhorn[{be.name}]", unit="it", leave=False) as bar:
        loop = _Loop(be, red, tol, max_iter, check_every, criterion, bar)
        if algo == "scaling":
            log_u, log_v, ok = _run_scaling(loop, prep.mat, a, b, log_v0)
            if not ok:
                if algorithm == "scaling":
                    raise FloatingPointError(
                        f"the scaling form under/overflowed in {cdtype} after iteration {loop.k} (lamb={lamb} is "
                        "too sharp for this dtype); use algorithm='log' or 'auto', or dtype=torch.float64")
                switched_at, algo, log_v0, log_u0 = loop.k, "log", log_v, log_u  # loop.k: last good check
                del prep
                prep = be.prepare(S, lamb, probs, exponentiate=False)
        if algo == "log":
            log_u, log_v = _run_log(loop, prep.mat, torch.log(a), torch.log(b), log_v0,
                                    log_u0 if switched_at is not None else None)
        labels = be.labels(prep.mat, log_v.contiguous(), linear=algo == "scaling")
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
