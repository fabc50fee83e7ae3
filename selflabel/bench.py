"""``selflabel bench``: selflabel's backends against every installed peer, in one run.

For each size and dtype, every solver gets:

- time per iteration: (time of L iterations - time of 1) / (L - 1), each time the fastest of
  runs repeated until their timed span passes ``min_span`` (50 ms) and L grown until the
  difference is at least half the long run. If the time budget ends the growth first, the
  figure is the long run's time over its iterations, setup included: an upper bound, marked.
  A time per iteration below the floor (the time to read the matrix once in that dtype,
  measured in the same run) is flagged as not trusted, in the JSON, the table and the plot.
- the error (L1 of both marginals) against time, for one run read at iterations 1, 2, 4, ...:
  the time of a point is the cumulative wall time of that run at that check (setup included,
  the bench's own error evaluations excluded), so the curve is non-decreasing in time by
  construction (and checked). POT cannot be paused: its run restarts from POT's warm start at
  each check, repeating POT's setup (its times are upper bounds, marked).
- the time to reach ``--tol``: the first check whose error is at most tol.

Solvers that cannot run here are listed as skipped, with the reason.

Writes a JSON report, a markdown table next to it and two PNG plots (with matplotlib: ``selflabel[bench]``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import itertools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import peers
from .io import atomic_write, save_json
from .select import triton_available
from .solver import sinkhorn_knopp
from .synthetic import make_scores

Runner = Callable[[int], float]  # run n iterations from scratch, return the marginal error

DIFFERENCE = "difference of two run lengths"
UPPER_BOUND = "long run time / iterations (setup included: an upper bound)"
RESTARTS = "restarted from a warm start at each check (setup repeated: times are upper bounds)"


class _StopRun(BaseException):
    """Ends a selflabel solve from inside its check (the curve's time budget is spent)."""


class Recorder:
    """The error-versus-time curve of one run: at each check, the cumulative wall time since the
    run began (setup included; time inside ``paused()`` excluded) and the error. Every time is
    read from the same clock, so the curve cannot run backwards; ``check`` asserts it anyway."""

    def __init__(self, device: str, tol: float, max_iter: int, budget: float) -> None:
        self.device, self.tol, self.max_iter, self.budget = device, tol, max_iter, budget
        self.points: list[dict] = []
        self.out_of_budget = False
        self._t0 = 0.0
        self._excluded = 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        gc.collect()
        self.points, self.out_of_budget, self._excluded = [], False, 0.0
        self._t0 = self._now()

    def elapsed(self) -> float:
        return self._now() - self._t0 - self._excluded

    @contextlib.contextmanager
    def paused(self):
        """The bench's own work (a peer's error evaluation) does not count as the run's time."""
        t = self._now()
        try:
            yield
        finally:
            self._excluded += self._now() - t

    def check(self, iterations: int, error: float, seconds: float) -> bool:
        """Record a check; True when the run should stop: tol reached, max_iter reached, or the
        next check (twice the iterations) would take the run past the budget."""
        point = {"iterations": int(iterations), "seconds": float(seconds), "error": float(error)}
        if self.points and point["iterations"] == self.points[-1]["iterations"]:
            self.points.pop()  # the same iterate checked again (an exact certifying pass): keep the later
        if self.points and (point["seconds"] < self.points[-1]["seconds"]
                            or point["iterations"] < self.points[-1]["iterations"]):
            raise AssertionError(f"error curve runs backwards in time: {self.points[-1]} then {point}")
        self.points.append(point)
        if point["error"] <= self.tol or point["iterations"] >= self.max_iter:
            return True
        if 2 * point["seconds"] > self.budget:
            self.out_of_budget = True
            return True
        return False


def _stepped(start: Callable[[], object], advance: Callable[[object, int], object],
             error: Callable[[object], float]) -> Callable[[Recorder], None]:
    """The curve of a solver held as a state: ``start()`` (setup, timed), ``advance(state, m)``
    (m more iterations, timed), ``error(state)`` (the bench's evaluation, not timed)."""
    def curve(rec: Recorder) -> None:
        rec.begin()
        state, k = start(), 0
        while True:
            m = min(max(k, 1), rec.max_iter - k)  # checks at 1, 2, 4, ... and max_iter
            state, k = advance(state, m), k + m
            seconds = rec.elapsed()
            with rec.paused():
                err = error(state)
            if rec.check(k, err, seconds):
                return
    return curve


@dataclass
class Prepared:
    """A solver set up on one matrix."""

    run: Runner  # n iterations from scratch -> error: the per-iteration timing
    curve: Callable[[Recorder], None]  # one run, reporting to the recorder at iterations 1, 2, 4, ...
    curve_note: str | None = None  # how the curve's run differs from one plain run, if it does


@dataclass
class Solver:
    name: str
    dtype: torch.dtype
    make: Callable[[torch.Tensor, float], Prepared] | None  # (probs on device, lamb) -> runner and curve
    skip: str | None = None


@contextlib.contextmanager
def _checked_at_powers_of_two(rec: Recorder):
    """selflabel's solver checks at iterations 1, 2, 4, ... (and max_iter), and each check reports
    the run's time and error to ``rec``; a spent budget ends the solve there."""
    from .iterate import Loop

    due, record = Loop.due, Loop.record

    def due_pow2(self) -> bool:
        return self.k == self.max_iter or self.k & (self.k - 1) == 0

    def record_timed(self, *args) -> bool:
        ended = record(self, *args)  # the check's host sync happens in here
        if rec.check(self.k, self.error, rec.elapsed()) and rec.out_of_budget:
            raise _StopRun
        return ended

    Loop.due, Loop.record = due_pow2, record_timed
    try:
        yield
    finally:
        Loop.due, Loop.record = due, record


def _ours(backend: str, algorithm: str, dtype: torch.dtype):
    def make(probs: torch.Tensor, lamb: float) -> Prepared:
        # chunked: a budget of a quarter of the matrix, so it really streams
        budget = max(probs.numel() * probs.element_size() // 4, 80 * 2**20) if backend == "chunked" else None
        # plain iterations, as every peer here runs: this bench compares the cost of an iteration
        # (benchmarks/bench_convergence.py measures time to solution with the acceleration)
        args = dict(kind="probs", lamb=lamb, backend=backend, algorithm=algorithm, dtype=dtype, memory_budget=budget,
                    acceleration="none")

        def run(n: int) -> float:
            return sinkhorn_knopp(probs, tol=0, max_iter=n, check_every=max(n, 1), **args).error

        def curve(rec: Recorder) -> None:  # a real solve to tol: the solver decides when it has converged
            with _checked_at_powers_of_two(rec), contextlib.suppress(_StopRun):
                rec.begin()
                sinkhorn_knopp(probs, tol=rec.tol, max_iter=rec.max_iter, **args)
        return Prepared(run, curve)
    return make


def _torch_loop(dtype: torch.dtype):
    def make(probs: torch.Tensor, lamb: float) -> Prepared:
        M = probs.to(dtype, copy=True).log_()
        M.sub_(M.amax(1, keepdim=True)).mul_(lamb).exp_()
        n, k = M.shape

        def start():  # peers.torch_matvec, held as a state
            a = torch.full((n,), 1.0 / n, dtype=M.dtype, device=M.device)
            b = torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device)
            return a, b, a, torch.ones(k, dtype=M.dtype, device=M.device)

        def advance(state, m: int):
            a, b, u, v = state
            for _ in range(m):
                u = a / (M @ v)
                v = b / (M.T @ u)
            return a, b, u, v

        def error(state) -> float:
            a, _, u, v = state
            return float((u * (M @ v) - a).abs().sum())
        return Prepared(lambda n: peers.torch_matvec(M, n), _stepped(start, advance, error))
    return make


def _swav(probs: torch.Tensor, lamb: float) -> Prepared:
    # SwAV exponentiates unshifted scores; fed log P at eps = 1/lamb whole columns underflow
    # and its loop turns NaN. Time it in its own regime: cosine-like scores, eps = 0.05.
    cosine = torch.log(probs)
    cosine /= -cosine.amin()

    def start():  # peers.swav_inplace, held as a state
        return peers.swav_start(cosine, 0.05)

    return Prepared(lambda n: peers.swav_inplace(cosine, 0.05, n), _stepped(start, peers.swav_steps, peers.swav_error))


def _sela(probs: torch.Tensor, lamb: float) -> Prepared:
    arr = probs.cpu().numpy()
    n, k = arr.shape

    def start():  # peers.sela_numpy, held as a state
        ps = np.ascontiguousarray(arr.T, dtype=np.float64)
        ps **= lamb
        return ps, np.ones((k, 1)) / k, np.ones((n, 1)) / n

    def advance(state, m: int):
        ps, r, c = state
        for _ in range(m):
            r = (1.0 / k) / (ps @ c)
            c = (1.0 / n) / (r.T @ ps).T
        return ps, r, c

    def error(state) -> float:
        ps, r, c = state
        return float(np.abs(r[:, 0] * (ps @ c)[:, 0] - 1.0 / k).sum())
    return Prepared(lambda m: peers.sela_numpy(arr, lamb, m), _stepped(start, advance, error))


def _pot(log_domain: bool):
    def make(probs: torch.Tensor, lamb: float) -> Prepared:
        scores = np.log(probs.cpu().numpy())
        n, k = scores.shape
        a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
        cost = -np.asarray(scores, dtype=np.float64)
        fn = peers.pot_sinkhorn_log if log_domain else peers.pot_sinkhorn

        def advance(state, m: int):  # POT's own run, resumed from the potentials of the last one
            import ot

            solve = ot.bregman.sinkhorn_log if log_domain else ot.sinkhorn
            warm = None if state is None else state[1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan, log = solve(a, b, cost, reg=1.0 / lamb, numItermax=m, stopThr=0.0, log=True, warmstart=warm)
                pot = (log["log_u"], log["log_v"]) if log_domain else (np.log(log["u"]), np.log(log["v"]))
            return plan, pot

        def error(state) -> float:
            plan = state[0]
            return float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
        return Prepared(lambda m: fn(scores, lamb, m), _stepped(lambda: None, advance, error), RESTARTS)
    return make


def solvers(device: str) -> list[Solver]:
    cuda = device == "cuda"
    out = []
    for dtype in (torch.float32, torch.float64):
        for algorithm in ("scaling", "log"):
            out.append(Solver(f"selflabel cpu {algorithm}", dtype, _ours("cpu", algorithm, dtype),
                              None if not cuda else "CPU backend; bench runs on cuda"))
            out.append(Solver(f"selflabel triton {algorithm}", dtype, _ours("triton", algorithm, dtype),
                              None if cuda and triton_available() else "needs a CUDA device and triton"))
        out.append(Solver("selflabel torch (reference)", dtype, _ours("torch", "auto", dtype)))
        out.append(Solver("torch two-matvec loop (SeLa gpu_sk)", dtype, _torch_loop(dtype)))
    out.append(Solver("selflabel chunked (budget: a quarter of the matrix)", torch.float32,
                      _ours("chunked", "auto", torch.float32),
                      "streams host memory to the GPU: benchmarks/bench_stream.py times it" if cuda else None))
    out.append(Solver("SwAV/DINOv2 in-place loop", torch.float32, _swav))
    cpu_only = "numpy peer: CPU only" if cuda else None
    out.append(Solver("SeLa numpy loop", torch.float64, _sela, cpu_only))
    pot = None if importlib.util.find_spec("ot") else "POT is not installed (pip install pot)"
    out.append(Solver("POT ot.sinkhorn", torch.float64, _pot(False), pot or cpu_only))
    out.append(Solver("POT ot.bregman.sinkhorn_log", torch.float64, _pot(True), pot or cpu_only))
    return out


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def best_time(fn: Callable[[], object], device: str = "cpu", min_span: float = 0.05, min_repeats: int = 3,
              max_repeats: int = 50, max_span: float = math.inf) -> tuple[float, int]:
    """The fastest of repeated calls of ``fn`` and how many ran: repeated until the timed span
    passes ``min_span`` with at least ``min_repeats`` calls, or ``max_repeats`` calls, or
    ``max_span`` seconds (a slow call). Python's garbage collector runs once before, not during."""
    times: list[float] = []
    gc.collect()
    gc.disable()
    try:
        while len(times) < max_repeats:
            times.append(_timed(fn, device))
            span = sum(times)
            if span >= max_span or (len(times) >= min_repeats and span >= min_span):
                break
    finally:
        gc.enable()
    return min(times), len(times)


def read_floor(x: torch.Tensor, device: str = "cpu", min_span: float = 0.05) -> float:
    """Seconds to stream ``x`` from memory once: the fastest of a few read-only reductions
    (a float32 sum is compute-bound on some CPUs; the same bytes summed as float64, or a
    max, are not; on CPU numpy's too, whose calls cost less than torch's on small matrices),
    each timed over enough back-to-back reads to pass the timer's resolution."""
    flat = x.reshape(-1)
    fns = [x.sum, x.amax]
    if x.dtype == torch.float32 and flat.numel() % 2 == 0:
        fns.append(flat.view(torch.float64).sum)
    if x.device.type == "cpu":
        arr = x.numpy()
        fns += [arr.sum, arr.max]
    best = math.inf
    for f in fns:
        reps = max(1, min(1000, int(1e-3 / max(_timed(f, device), 1e-9))))  # about 1 ms per timed call
        t, _ = best_time(lambda f=f, reps=reps: [f() for _ in range(reps)], device, min_span / len(fns))
        best = min(best, t / reps)
    return best


def per_iteration(run: Runner, device: str = "cpu", min_span: float = 0.05, budget: float = 20.0,
                  max_long: int = 1 << 16) -> dict:
    """Seconds per iteration of ``run``: (best time of L iterations - best time of 1) / (L - 1),
    L = 4, 16, 64, ... until the difference is resolved (at least half the long run's time). If
    ``budget`` seconds or ``max_long`` iterations end the growth first: the long run's time over
    its iterations, setup included (an upper bound). Never negative, never missing."""
    t_start = time.perf_counter()
    cap = budget / 4  # the most one repeated timing may spend
    run(1)  # warm-up: imports, allocator, caches
    short, repeats = best_time(lambda: run(1), device, min_span, max_span=cap)
    runs = [{"iterations": 1, "best_s": short, "repeats": repeats}]
    long_n = 4
    while True:
        long, repeats = best_time(lambda n=long_n: run(n), device, min_span, max_span=cap)
        runs.append({"iterations": long_n, "best_s": long, "repeats": repeats})
        if long - short >= 0.5 * long:
            return {"seconds": (long - short) / (long_n - 1), "method": DIFFERENCE, "runs": runs}
        # the next long run: 4x the iterations, up to 4x the time, repeated at least twice
        if 4 * long_n > max_long or time.perf_counter() - t_start + 8 * long > budget:
            return {"seconds": long / long_n, "method": UPPER_BOUND, "runs": runs}
        long_n *= 4


def assert_forward(curve: list[dict], name: str = "") -> None:
    """Raise unless the curve's times and iterations never decrease."""
    for a, b in itertools.pairwise(curve):
        if b["seconds"] < a["seconds"] or b["iterations"] < a["iterations"]:
            raise AssertionError(f"{name}: error curve runs backwards in time: {a} then {b}")


def measure(solver: Solver, probs: torch.Tensor, lamb: float, tol: float, max_iter: int, device: str,
            budget: float = 60.0, min_span: float = 0.05, floor_ms: float | None = None) -> dict:
    """Per-iteration time (flagged when below ``floor_ms``), error curve of one run and time to
    ``tol``; about ``budget`` seconds at most: a curve cut short by it is flagged."""
    prepared = solver.make(probs, lamb)
    timing = per_iteration(prepared.run, device, min_span, budget=0.4 * budget)
    ms = timing["seconds"] * 1e3
    rec = Recorder(device, tol, max_iter, budget=0.6 * budget)
    row = {"ms_per_iter": ms, "ms_per_iter_method": timing["method"],
           "below_read_floor": floor_ms is not None and ms < floor_ms, "timing_runs": timing["runs"]}
    try:
        prepared.curve(rec)
    except FloatingPointError as exc:  # the solve itself failed (a dtype too narrow for its algorithm)
        row["curve_failed"] = str(exc)
    curve = rec.points
    assert_forward(curve, solver.name)
    to_tol = next(({"iterations": c["iterations"], "seconds": c["seconds"]} for c in curve if c["error"] <= tol), None)
    row.update({"curve": curve, "curve_time": prepared.curve_note or "cumulative wall time of one run",
                "to_tol": to_tol, "curve_truncated_by_time_budget": rec.out_of_budget and to_tol is None})
    return row


def machine(device: str = "cpu") -> dict:
    """What the figures were measured on: CPU, GPU, threads, library and BLAS versions."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads(), "device": device,
            "env_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for p in threadpool_info()]
    except ImportError:
        pass
    return info


FLOOR = "read matrix once (floor)"
BELOW_FLOOR = "below read floor: not trusted"


def _ms(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3g}"


def markdown(report: dict) -> str:
    lines = ["| N x K | solver | dtype | ms / iteration | iterations to tol | seconds to tol |",
             "|---|---|---|---|---|---|"]
    for size in report["sizes"]:
        shape = f"{size['n']} x {size['k']}"
        for dtype, floor in size["read_floor_ms_by_dtype"].items():
            lines.append(f"| {shape} | {FLOOR} | {dtype} | {_ms(floor)} | | |")
        for r in size["results"]:
            if "skipped" in r:
                lines.append(f"| {shape} | {r['solver']} | {r['dtype']} | skipped: {r['skipped']} | | |")
                continue
            ms = _ms(r["ms_per_iter"])
            if r["ms_per_iter_method"] == UPPER_BOUND:
                ms += " (upper bound)"
            if r["below_read_floor"]:
                ms += f" ({BELOW_FLOOR})"
            tt = r["to_tol"]
            if tt:
                its, secs = tt["iterations"], f"{tt['seconds']:.3f}"
                if r["curve_time"] == RESTARTS:
                    secs += " (restarts)"
            else:
                its = "failed" if "curve_failed" in r else "not reached"
                secs = "time budget" if r["curve_truncated_by_time_budget"] else ""
            lines.append(f"| {shape} | {r['solver']} | {r['dtype']} | {ms} | {its} | {secs} |")
    lines += ["", "ms / iteration: (time of L iterations - time of 1) / (L - 1), fastest of repeated runs; "
              "(upper bound): the difference stayed under half the long run within the time budget, so the "
              "long run's time over its iterations, setup included; "
              f"({BELOW_FLOOR}): faster than reading the matrix once in that dtype. "
              "Seconds to tol: cumulative wall time of one run at the first check (iterations 1, 2, 4, ...) "
              f"whose error is at most tol; (restarts): {RESTARTS}."]
    return "\n".join(lines)


# One colour per solver (tab10), fixed, so a solver looks the same in every plot. The CPU and the
# Triton backend of one algorithm share a colour and differ by marker: a report runs on one device,
# so they never appear together. Dtypes differ by line style.
SOLVER_STYLE = {
    "selflabel cpu scaling": (0, "o"),
    "selflabel triton scaling": (0, "P"),
    "selflabel cpu log": (1, "s"),
    "selflabel triton log": (1, "X"),
    "selflabel torch (reference)": (2, "^"),
    "torch two-matvec loop (SeLa gpu_sk)": (3, "v"),
    "selflabel chunked (budget: a quarter of the matrix)": (4, "D"),
    "SwAV/DINOv2 in-place loop": (6, "<"),
    "SeLa numpy loop": (7, ">"),
    "POT ot.sinkhorn": (8, "p"),
    "POT ot.bregman.sinkhorn_log": (9, "*"),
}
DTYPE_LINESTYLE = {"float32": "-", "float64": "--"}
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]  # matplotlib's tab10, here so the mapping needs no matplotlib


def series_style(solver: str, dtype: str) -> dict:
    """Plot style of one series: colour and marker by solver, line style by dtype."""
    if solver == FLOOR:
        return {"color": "black", "linestyle": ":" if dtype == "float32" else "-.", "marker": None}
    index, marker = SOLVER_STYLE.get(solver, (None, "d"))
    colour = TAB10[index] if index is not None else "black"
    return {"color": colour, "linestyle": DTYPE_LINESTYLE.get(dtype, ":"), "marker": marker}


def size_axis(sizes: list[tuple[int, int]]) -> tuple[str, list[float], list[str] | None]:
    """The time plot's x axis, named by what varies across ``sizes``: its label, the x of each
    size and tick labels (None: plain numbers)."""
    ns, ks = {n for n, _ in sizes}, {k for _, k in sizes}
    if len(ns) > 1 and len(ks) == 1:
        return f"N (rows), K = {next(iter(ks))}", [float(n) for n, _ in sizes], None
    if len(ks) > 1 and len(ns) == 1:
        return f"K (columns), N = {next(iter(ns))}", [float(k) for _, k in sizes], None
    return "N x K entries (matrix size)", [float(n * k) for n, k in sizes], [f"{n} x {k}" for n, k in sizes]


def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    return plt, fig, ax


def _save(plt, fig, ax, path: str) -> str:
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(report: dict, stem: str) -> list[str]:
    """Time per iteration against the matrix size, and error against time at the largest size (PNG)."""
    sizes = [(s["n"], s["k"]) for s in report["sizes"]]
    xlabel, xs, ticks = size_axis(sizes)
    device = report["machine"].get("gpu") or report["machine"]["cpu"]
    plt, fig, ax = _axes(f"time per iteration ({device})", xlabel, "ms per iteration")
    series: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    for x, size in zip(xs, report["sizes"], strict=True):
        for dtype, floor in size["read_floor_ms_by_dtype"].items():
            series.setdefault((FLOOR, dtype), []).append((x, floor, False))
        for r in size["results"]:
            if "skipped" not in r:
                series.setdefault((r["solver"], r["dtype"]), []).append((x, r["ms_per_iter"], r["below_read_floor"]))
    flagged_label = f"{BELOW_FLOOR} (x)"
    for (solver, dtype), pts in series.items():
        style = series_style(solver, dtype)
        trusted = sorted((x, y) for x, y, bad in pts if not bad)
        if trusted:
            ax.plot([x for x, _ in trusted], [y for _, y in trusted], markersize=4, label=f"{solver} [{dtype}]",
                    **style)
        flagged = [(x, y) for x, y, bad in pts if bad]
        if flagged:  # not part of the line: a time below the floor is not a result
            ax.plot([x for x, _ in flagged], [y for _, y in flagged], linestyle="none", marker="x", markersize=8,
                    color=style["color"], label=flagged_label)
            flagged_label = None
    if ticks is not None:  # both N and K vary: name each size where it is
        from matplotlib.ticker import NullLocator

        ax.set_xticks(xs, ticks, fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
    paths = [_save(plt, fig, ax, f"{stem}_time.png")]

    last = report["sizes"][-1]
    plt, fig, ax = _axes(f"error vs time of one run, N={last['n']}, K={last['k']} ({device})",
                         "seconds since the run began (cumulative wall time, setup included)", "L1 marginal error")
    for r in last["results"]:
        if "skipped" in r or not r["curve"]:
            continue
        assert_forward(r["curve"], r["solver"])
        t = [c["seconds"] for c in r["curve"]]
        label = f"{r['solver']} [{r['dtype']}]" + (" (restarts)" if r["curve_time"] == RESTARTS else "")
        ax.plot([max(s, 1e-6) for s in t], [max(c["error"], 1e-16) for c in r["curve"]], markersize=3, label=label,
                **series_style(r["solver"], r["dtype"]))
    ax.axhline(report["tol"], color="gray", linestyle=":", linewidth=1)
    paths.append(_save(plt, fig, ax, f"{stem}_error.png"))
    return paths


def run_bench(sizes: list[tuple[int, int]], device: str = "cpu", lamb: float = 25.0, tol: float = 1e-4,
              max_iter: int = 1024, out: str = "bench-report.json", progress: bool = True,
              min_span: float = 0.05, budget: float = 60.0) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    report = {"benchmark": "selflabel bench", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "lamb": lamb, "tol": tol, "min_span_s": min_span, "budget_s_per_solver": budget,
              "machine": machine(device), "sizes": []}
    for n, k in sizes:
        probs = make_scores(n, k, kind="probs", temperature=4.0, seed=0).to(device)
        floors = {}
        for dtype in (torch.float32, torch.float64):
            x = probs.to(dtype)
            floors[str(dtype).split(".")[-1]] = read_floor(x, device, min_span) * 1e3
            del x
        entry = {"n": n, "k": k, "read_floor_ms": floors["float32"], "read_floor_ms_by_dtype": floors, "results": []}
        for s in solvers(device):
            row = {"solver": s.name, "dtype": str(s.dtype).split(".")[-1]}
            if s.skip is not None:
                row["skipped"] = s.skip
            else:
                row.update(measure(s, probs, lamb, tol, max_iter, device, budget, min_span, floors[row["dtype"]]))
            entry["results"].append(row)
            if progress:
                if "skipped" in row:
                    status = row["skipped"]
                else:
                    status = f"{_ms(row['ms_per_iter'])} ms/iter" + (" (upper bound)" * (
                        row["ms_per_iter_method"] == UPPER_BOUND)) + (f" ({BELOW_FLOOR})" * row["below_read_floor"])
                print(f"  N={n} K={k} {row['solver']:38s} {row['dtype']:8s} {status}", flush=True)
        report["sizes"].append(entry)
        del probs
    stem = os.path.splitext(out)[0]
    save_json(out, report)
    table = markdown(report)
    with atomic_write(f"{stem}.md", "w") as fh:
        fh.write(table + "\n")
    try:
        pngs = plots(report, stem)
    except ModuleNotFoundError as exc:  # the JSON and the table are written; only the plots need matplotlib
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        pngs = []
        print(f"no plots: they need matplotlib ({exc}): pip install 'selflabel[bench]'")
    report["files"] = [out, f"{stem}.md", *pngs]
    print(table)
    print("wrote " + ", ".join(report["files"]))
    return report


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark selflabel against the peers installed here",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, under two minutes on 2 CPU cores")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", nargs="*", default=None, help="NxK sizes, e.g. 20000x500 200000x3000")
    p.add_argument("--lamb", type=float, default=25.0)
    p.add_argument("--tol", type=float, default=1e-4, help="error for the time-to-tolerance figure")
    p.add_argument("--out", default="bench-report.json")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    if args.sizes:
        try:
            sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
        except ValueError:
            raise ValueError(f"--sizes takes NxK pairs such as 20000x500, got {args.sizes}") from None
    elif args.quick:
        sizes = [(2000, 100), (8000, 200)]
    else:
        sizes = [(20_000, 500), (100_000, 1000), (200_000, 3000)]
    run_bench(sizes, device=args.device, lamb=args.lamb, tol=args.tol, max_iter=256 if args.quick else 1024,
              out=args.out)
    return 0
