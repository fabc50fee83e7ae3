"""The solver front: ``sinkhorn_knopp`` and ``sinkhorn_knopp_features``.

A solve is: check the options (``selflabel.validate``), turn the scores into what a backend reads
and pick that backend (``selflabel.select``), agree with the other ranks, iterate
(``selflabel.iterate``), label, and build the result. Backends (``selflabel.backends``) only run
passes.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from .accel import Relaxation
from .distributed import Reducer
from .features import Features
from .iterate import Kernel, Loop, solve, starting_form
from .result import SinkhornResult
from .select import select
from .validate import (
    ALGORITHMS,
    KINDS,
    check_columns,
    check_marginal,
    check_options,
    init_log_v,
    marginals,
    validate_prepared,
)

__all__ = ["ALGORITHMS", "KINDS", "sinkhorn_knopp", "sinkhorn_knopp_features"]


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
        lamb, tol, max_iter, check_every = check_options(lamb, kind, algorithm, criterion, acceleration, tol,
                                                         max_iter, check_every)
        sel = select(scores, backend=backend, algorithm=algorithm, device=device, dtype=dtype,
                     memory_budget=memory_budget)
        (H, N, K), cdtype, device = sel.shape, sel.cdtype, sel.device
        log_v0 = init_log_v(init, H, K, cdtype, device)
        a_raw = check_marginal(row_marginal, N, "row_marginal", "N", device)
        b_raw = check_marginal(col_marginal, K, "col_marginal", "K", device)
        kernel = Kernel(sel.backend, sel.scores, lamb, kind == "probs", log=sel.algorithm == "log")
        validate_prepared(kernel.prep, kind == "probs", sel.storage, sel.raw3)
    except Exception as exc:  # with a process group every failure must reach every rank
        if not red.active:
            raise
        error = exc
    # Every option that shapes the collectives or the answer must be the same on every rank.
    agreed = dict(dtype=cdtype, heads=H, K=K, lamb=lamb, kind=kind, algorithm=algorithm, tol=tol, max_iter=max_iter,
                  check_every=check_every, criterion=criterion, acceleration=acceleration, col_marginal=b_raw,
                  init=log_v0, gather_labels=gather_labels) if red.active else {}
    n_total, row_offset = red.agree(error, N, agreed, row_marginal_given=row_marginal is not None)
    if n_total < K:
        warnings.warn(f"N={n_total} samples < K={K} clusters: hard labels cannot be balanced", UserWarning,
                      stacklevel=2)
    m = marginals(a_raw, b_raw, sel.shape, n_total, cdtype, device, red)
    colmax = red.max_(kernel.prep.colmax.clone())
    check_columns(colmax)
    form = starting_form(algorithm, kernel, colmax, m, red)
    rowmax, be = kernel.prep.rowmax, sel.backend
    # One bar for the solve: iterations and the error at the last check (no total: a solve stops at tol,
    # not at max_iter). Streaming backends advance it block by block.
    with tqdm(disable=not progress, desc=f"sinkhorn[{be.name}]", unit="it", leave=False) as bar:
        if progress:
            be.advance = bar.update
        loop = Loop(be, red, tol, max_iter, check_every, criterion, bar, Relaxation(acceleration != "none"))
        out = solve(loop, kernel, m, log_v0, colmax, form, algorithm, n_total)
        label_mat, label_v = kernel.label_operands(out.form == "log", out.log_v)
        labels, err = loop.local(be.labels, label_mat, label_v.contiguous(), out.form == "scaling", row_offset)
        red.check(err)
        if gather_labels:
            labels = red.gather_rows(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    squeeze = (lambda t: t) if sel.stacked else (lambda t: t[0])
    return SinkhornResult(
        labels=squeeze(labels), log_u=squeeze(out.log_u), log_v=squeeze(out.log_v), n_iter=loop.k,
        converged=loop.converged, error=loop.error, history=loop.history,
        seconds=time.perf_counter() - t0, algorithm=out.form, backend=be.name, switched_at=out.switched_at,
        lamb=float(lamb), kind=kind, _scores=sel.raw3, _rowmax=rowmax,
    )


def sinkhorn_knopp_features(features: Any, prototypes: Any, bias: Any = None, *, memory_budget: int | str | None = None,
                            **options: Any) -> SinkhornResult:
    """Label N samples from features (N, D) and prototypes (K, D) or (H, K, D), with scores
    ``lamb * (X W^T + bias)`` treated as logits and never stored whole.

    Args:
        features: (N, D) tensor, array, memmap or ``.npy`` path (streamed in row blocks).
        prototypes: (K, D), or (H, K, D) for H heads (labels (H, N)).
        bias: (K,) or (H, K), optional.
        memory_budget: bytes or "512MB" for the solver's buffers (default: a quarter of RAM); "chunked" only.
        **options: as for ``sinkhorn_knopp`` (lamb, algorithm, dtype, tol, max_iter, init, device, ...), and
            ``backend``: "auto" ("triton" for CUDA features, or with ``device="cuda"`` and no
            ``memory_budget``, which loads the features onto the GPU; else "chunked"), "chunked"
            (CPU BLAS blocks, features may be a file; with ``device="cuda"`` the score blocks are
            streamed to the GPU) or "triton" (fused ``tl.dot`` log-domain kernel, reported as
            backend "triton-implicit"; float32 features at the precision
            ``torch.set_float32_matmul_precision`` sets (float32 products at torch's default
            "highest", TF32 at "medium"), bfloat16/float16 as they are, float64 exactly).
    """
    if "kind" in options and options["kind"] != "logits":
        raise ValueError("sinkhorn_knopp_features scores are logits (X W^T + bias); kind cannot be changed")
    options.pop("kind", None)
    return sinkhorn_knopp(Features(features, prototypes, bias), kind="logits", memory_budget=memory_budget, **options)
