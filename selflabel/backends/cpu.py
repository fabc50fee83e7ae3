"""Fused C++ CPU backend: thin wrappers over selflabel._C (csrc/bindings.cpp, csrc/kernels.h)."""

from __future__ import annotations

import time

import torch

from . import BackendBase, Prepared, ScoreBlock


def _ext():
    try:
        from selflabel import _C
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError(
            "selflabel._C is not built; install from source with "
            "`pip install --no-build-isolation -e .` or use backend='torch'"
        ) from exc
    return _C


def _operands(mat) -> tuple[torch.Tensor, dict]:
    """The matrix argument of a pass and, for a ``ScoreBlock``, the score-mode keywords."""
    if isinstance(mat, ScoreBlock):
        return mat.scores, {"shift": mat.shift, "lamb": float(mat.lamb), "probs": mat.probs}
    return mat, {}


class WorkerCount:
    """How many threads an iteration pass runs on, chosen by what the passes measure.

    A pass gives the same bits at any thread count (rows are cut into chunks by N alone and the
    column partials are added in chunk order), so the count may change from one pass to the next.
    On a quiet machine all of ``torch.get_num_threads()`` win; on a busy one (DataLoader workers,
    other jobs on the cores) a parallel pass waits for whichever thread the scheduler has not run,
    and one thread can be several times faster. The first four passes alternate between all threads
    and one; then the faster by the median of its last five passes' seconds runs (a pass on a busy
    machine is sometimes preempted and sometimes lucky: the median ignores both), and the other is
    tried once every ``interval`` passes (16, then 32 while the choice holds; at once again while the
    tries beat the choice), so a change of load is noticed within a few dozen passes.
    """

    def __init__(self) -> None:
        self.recent: dict[int, list[float]] = {}  # the last five seconds per thread count
        self.best = 0
        self.interval = 16
        self.since = 0
        self.exploring = 0

    def pick(self, many: int | None = None) -> int:
        """The thread count of the next pass: ``many`` (default ``torch.get_num_threads()``) or one."""
        many = torch.get_num_threads() if many is None else many
        if many <= 1:
            return 1
        options = (many, 1)
        done = sum(len(self.recent.get(t, ())) for t in options)
        if done < 4:  # the warm-up: many, 1, many, 1
            return options[done % 2]
        best = self.faster(many)
        if best != self.best:
            self.best, self.interval, self.since = best, 16, 0
        self.since += 1
        if self.since >= self.interval:
            self.since, self.interval = 0, min(2 * self.interval, 32)
            self.exploring = options[1 - options.index(best)]
            return self.exploring
        return best

    def faster(self, many: int) -> int:
        """``many`` or one, whichever the recent passes measured faster (``many`` before any)."""
        return min((many, 1), key=self.typical)

    def typical(self, threads: int) -> float:
        """The median of the last five passes on ``threads`` (inf before any)."""
        times = sorted(self.recent.get(threads, ()))
        return times[len(times) // 2] if times else float("inf")

    def record(self, threads: int, seconds: float) -> None:
        self.recent[threads] = (self.recent.get(threads, []) + [seconds])[-5:]
        if threads == self.exploring:
            self.exploring = 0
            if seconds < self.typical(self.best):  # promising: try it again at once (its window is old)
                self.since = self.interval


class CpuBackend(BackendBase):
    """``threads``: at most this many worker threads per pass; 0 (the default) lets the iteration
    passes choose between ``torch.get_num_threads()`` and one by their measured speed
    (``WorkerCount``), and runs the other passes on ``torch.get_num_threads()``."""

    name = "cpu"
    recomputes_rows = True  # the passes accept a ScoreBlock
    absorbs = True  # prepare takes col_pot

    def __init__(self, threads: int = 0) -> None:
        self._C = _ext()
        self.threads = threads
        self._counts: dict[tuple, WorkerCount] = {}

    def _timed(self, fn, key: tuple, *args, **kwargs):
        """``fn(*args, threads=..., **kwargs)`` on the worker count that ``key``'s passes run fastest."""
        if self.threads:
            return fn(*args, threads=self.threads, **kwargs)
        count = self._counts.setdefault(key, WorkerCount())
        threads = count.pick()
        start = time.perf_counter()
        out = fn(*args, threads=threads, **kwargs)
        count.record(threads, time.perf_counter() - start)
        return out

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool,
                col_pot: torch.Tensor | None = None) -> Prepared:
        out = self._C.prepare(scores, float(lamb), probs, exponentiate, threads=self.threads,
                              col_pot=None if col_pot is None else col_pot.contiguous())
        return Prepared(*out[:5], out[5] if col_pot is not None else None)

    def log_view(self, prep: Prepared, scores: torch.Tensor, lamb: float, probs: bool) -> ScoreBlock:
        """The log kernel of ``prep``, recomputed row by row from the scores inside the passes."""
        return ScoreBlock(scores, prep.rowmax, float(lamb), probs)

    def scaling_pass(self, M, a, u, v, omega=1.0):
        M, mode = _operands(M)
        return self._timed(self._C.scaling_pass, ("scaling", M.shape, M.dtype, bool(mode)), M, a, u, v,
                           omega=float(omega), **mode)

    def log_pass(self, L, log_a, f, g, omega=1.0):
        L, mode = _operands(L)
        return self._timed(self._C.log_pass, ("log", L.shape, L.dtype, bool(mode)), L, log_a, f, g,
                           omega=float(omega), **mode)

    def column_sums(self, M: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """w = M^T u per head: (H, K)."""
        return self._C.column_sums(M, u.contiguous(), threads=self.threads)

    def normalised_rows(self, M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows of M diag(v), each divided by its sum: (H, N, K)."""
        return self._C.normalised_rows(M, v.contiguous(), threads=self.threads)

    def labels(self, mat, log_v, linear, row_offset=0):
        mat, mode = _operands(mat)
        return self._C.labels(mat, log_v.contiguous(), linear, **mode, threads=self.threads, row_offset=row_offset)
