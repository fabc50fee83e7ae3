"""``selflabel bench``: selflabel's backends against every installed peer, in one run.

For each size and dtype, every solver gets: time per iteration (two run lengths,
differenced), the error (L1 of both marginals) after 1, 2, 4, ... iterations with
the wall time of each run (the error-versus-time curve), and the time to reach
``--tol``. The floor is the time to read the matrix once, measured in the same run.
Solvers that cannot run here are listed as skipped, with the reason.

Writes a JSON report, a markdown table next to it and two PNG plots (with matplotlib: ``selflabel[bench]``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import peers
from .backends import triton_available
from .io import atomic_write, save_json
from .solver import sinkhorn_knopp
from .synthetic import make_scores

Runner = Callable[[int], float]  # run n iterations, return the marginal error


@dataclass
class Solver:
    name: str
    dtype: torch.dtype
    make: Callable[[torch.Tensor, float], Runner] | None  # (probs on device, lamb) -> runner
    skip: str | None = None


def _ours(backend: str, algorithm: str, dtype: torch.dtype):
    def make(probs: torch.Tensor, lamb: float) -> Runner:
        # chunked: a budget of a quarter of the matrix, so it really streams
        budget = max(probs.numel() * probs.element_size() // 4, 80 * 2**20) if backend == "chunked" else None

        def run(n: int) -> float:
            return sinkhorn_knopp(probs, kind="probs", lamb=lamb, backend=backend, algorithm=algorithm, dtype=dtype,
                                  tol=0, max_iter=n, check_every=max(n, 1), memory_budget=budget).error
        return run
    return make


def _torch_loop(dtype: torch.dtype):
    def make(probs: torch.Tensor, lamb: float) -> Runner:
        M = probs.to(dtype, copy=True).log_()
        M.sub_(M.amax(1, keepdim=True)).mul_(lamb).exp_()
        return lambda n: peers.torch_matvec(M, n)
    return make


def _swav(probs: torch.Tensor, lamb: float) -> Runner:
    # SwAV exponentiates unshifted scores; fed log P at eps = 1/lamb whole columns underflow
    # and its loop turns NaN. Time it in its own regime: cosine-like scores, eps = 0.05.
    cosine = torch.log(probs)
    cosine /= -cosine.amin()
    return lambda n: peers.swav_inplace(cosine, 0.05, n)


def _numpy(fn):
    def make(probs: torch.Tensor, lamb: float) -> Runner:
        arr = probs.cpu().numpy()
        arg = arr if fn is peers.sela_numpy else np.log(arr)
        return lambda n: fn(arg, lamb, n)
    return make


def solvers(device: str) -> list[Solver]:
    cuda = device == "cuda"
    out = []
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).split(".")[-1]
        for algorithm in ("scaling", "log"):
            out.append(Solver(f"selflabel cpu {algorithm}", dtype, _ours("cpu", algorithm, dtype),
                              None if not cuda else "CPU backend; bench runs on cuda"))
            out.append(Solver(f"selflabel triton {algorithm}", dtype, _ours("triton", algorithm, dtype),
                              None if cuda and triton_available() else "needs a CUDA device and triton"))
        out.append(Solver("selflabel torch (reference)", dtype, _ours("torch", "auto", dtype)))
        out.append(Solver("torch two-matvec loop (SeLa gpu_sk)", dtype, _torch_loop(dtype)))
        del tag
    out.append(Solver("selflabel chunked (budget N*K*4/4)", torch.float32, _ours("chunked", "auto", torch.float32),
                      "CPU backend; bench runs on cuda" if cuda else None))
    out.append(Solver("selflabel implicit", torch.float32, None,
                      "solves from features x prototypes (sinkhorn_knopp_features), not from this score matrix"))
    out.append(Solver("SwAV/DINOv2 in-place loop", torch.float32, _swav))
    cpu_only = "numpy peer: CPU only" if cuda else None
    out.append(Solver("SeLa numpy loop", torch.float64, _numpy(peers.sela_numpy), cpu_only))
    pot = None if importlib.util.find_spec("ot") else "POT is not installed (pip install pot)"
    out.append(Solver("POT ot.sinkhorn", torch.float64, _numpy(peers.pot_sinkhorn), pot or cpu_only))
    out.append(Solver("POT ot.bregman.sinkhorn_log", torch.float64, _numpy(peers.pot_sinkhorn_log), pot or cpu_only))
    return out


def _timed(fn: Callable[[], object], device: str) -> float:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def read_floor(x: torch.Tensor, device: str = "cpu") -> float:
    """Seconds to stream ``x`` from memory once: the fastest of a few read-only reductions
    (a float32 sum is compute-bound on some CPUs; the same bytes summed as float64, or a
    max, are not)."""
    flat = x.reshape(-1)
    fns = [lambda: x.sum(), lambda: x.amax()]
    if x.dtype == torch.float32 and flat.numel() % 2 == 0:
        fns.append(lambda: flat.view(torch.float64).sum())
    return min(min(_timed(f, device) for _ in range(3)) for f in fns)


def measure(solver: Solver, probs: torch.Tensor, lamb: float, tol: float, max_iter: int, device: str,
            budget: float = 60.0) -> dict:
    """Per-iteration time, error curve and time to ``tol``; a solver whose runs exceed
    ``budget`` seconds gets shorter timing runs and a truncated curve (flagged)."""
    run = solver.make(probs, lamb)
    one = _timed(lambda: run(1), device)
    short, long = (5, 45) if one * 45 < budget / 4 else (1, 3)
    per_iter = (min(_timed(lambda: run(long), device) for _ in range(2))
                - min(_timed(lambda: run(short), device) for _ in range(2))) / (long - short)
    curve, to_tol, spent, truncated = [], None, 0.0, False
    n = 1
    while n <= max_iter:
        seconds = _timed(lambda n=n: curve.append({"iterations": n, "error": run(n)}), device)
        curve[-1]["seconds"] = seconds
        spent += seconds
        if curve[-1]["error"] <= tol:
            to_tol = {"iterations": n, "seconds": seconds}
            break
        if spent > budget:
            truncated = True
            break
        n *= 2
    # a difference at or below zero means the runs were too short to resolve one iteration
    return {"ms_per_iter": per_iter * 1e3 if per_iter > 0 else None, "curve": curve, "to_tol": to_tol,
            "curve_truncated_by_time_budget": truncated}


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


def markdown(report: dict) -> str:
    lines = ["| N x K | solver | dtype | ms / iteration | iterations to tol | seconds to tol |",
             "|---|---|---|---|---|---|"]
    for size in report["sizes"]:
        shape = f"{size['n']} x {size['k']}"
        lines.append(f"| {shape} | read matrix once (floor) | float32 | {size['read_floor_ms']:.2f} | | |")
        for r in size["results"]:
            if "skipped" in r:
                lines.append(f"| {shape} | {r['solver']} | {r['dtype']} | skipped: {r['skipped']} | | |")
                continue
            tt = r["to_tol"]
            its, secs = (tt["iterations"], f"{tt['seconds']:.3f}") if tt else ("not reached", "")
            ms = f"{r['ms_per_iter']:.2f}" if r["ms_per_iter"] is not None else "not resolved (timing noise)"
            lines.append(f"| {shape} | {r['solver']} | {r['dtype']} | {ms} | {its} | {secs} |")
    return "\n".join(lines)


def _loglog(path: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
            hline: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.get_cmap("tab20").colors)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(report: dict, stem: str) -> list[str]:
    """Time per iteration against N, and error against time at the largest size (PNG)."""
    times: dict[str, list[tuple[float, float]]] = {}
    for size in report["sizes"]:
        times.setdefault("read matrix once (floor)", []).append((size["n"], size["read_floor_ms"]))
        for r in size["results"]:
            if "skipped" not in r and r["ms_per_iter"] is not None:
                times.setdefault(f"{r['solver']} [{r['dtype']}]", []).append((size["n"], r["ms_per_iter"]))
    device = report["machine"].get("gpu") or report["machine"]["cpu"]
    last = report["sizes"][-1]
    errors = {f"{r['solver']} [{r['dtype']}]": [(c["seconds"], max(c["error"], 1e-16)) for c in r["curve"]]
              for r in last["results"] if "skipped" not in r and r["curve"]}
    return [_loglog(f"{stem}_time.png", {k: sorted(v) for k, v in times.items()}, "N (samples)",
                    "ms per iteration", f"time per iteration ({device})"),
            _loglog(f"{stem}_error.png", errors, "seconds", "L1 marginal error",
                    f"error vs time, N={last['n']}, K={last['k']}", hline=report["tol"])]


def run_bench(sizes: list[tuple[int, int]], device: str = "cpu", lamb: float = 25.0, tol: float = 1e-4,
              max_iter: int = 1024, out: str = "bench-report.json", progress: bool = True) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    report = {"benchmark": "selflabel bench", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "lamb": lamb, "tol": tol, "machine": machine(device), "sizes": []}
    for n, k in sizes:
        probs = make_scores(n, k, kind="probs", temperature=4.0, seed=0).to(device)
        entry = {"n": n, "k": k, "read_floor_ms": read_floor(probs, device) * 1e3, "results": []}
        for s in solvers(device):
            row = {"solver": s.name, "dtype": str(s.dtype).split(".")[-1]}
            if s.skip is not None:
                row["skipped"] = s.skip
            else:
                row.update(measure(s, probs, lamb, tol, max_iter, device))
            entry["results"].append(row)
            if progress:
                ms = row.get("ms_per_iter")
                status = row.get("skipped") or (f"{ms:.2f} ms/iter" if ms is not None else "not resolved")
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
        if (exc.name or "").split(".")[0] not in ("matplotlib", "cycler"):
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
