"""Implicit mode speed and memory: solving from features x prototypes vs the materialised matrix.

Per-iteration seconds are differenced over two run lengths in one process (prepare and labels
cancel out); the materialised side also reports the X W^T matmul as setup. Each mode runs in
its own process so its peak RSS (CPU) or peak allocated GPU memory is its own.

    python benchmarks/bench_implicit.py                         # CPU: N=400k, K=2000, D=64, one head
    python benchmarks/bench_implicit.py --device cuda           # GPU: N=1.28M, K=3000, D=128 and D=2048 x 10 heads
    python benchmarks/bench_implicit.py --n 20000 --k 200 --no-save
    python benchmarks/bench_implicit.py --device cuda --precision high   # float32 tl.dot in three TF32 products

``--precision`` sets ``torch.set_float32_matmul_precision`` in each run: the implicit kernel's float32
products follow it (``selflabel.kernels.implicit.dot_precision``), and so does the materialised ``X W^T``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import resource
import sys
import time

import torch

import selflabel as sl
from selflabel.bench import machine
from selflabel.io import save_json


def _inputs(n: int, k: int, d: int, heads: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype)
    w = torch.nn.functional.normalize(torch.randn(heads, k, d, device=device, generator=gen), dim=-1).to(dtype)
    return x, (w[0] if heads == 1 else w)


def _child(q, mode, n, k, d, heads, device, iters, dtype, precision):
    """In a fresh process: solve ``iters[0]`` then ``iters[1]`` iterations; report times and peak memory."""
    try:
        torch.set_float32_matmul_precision(precision)
        x, w = _inputs(n, k, d, heads, device, dtype)
        opts = dict(lamb=25.0, tol=0.0, algorithm="log")

        def timed(fn):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t, out

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        setup = 0.0
        if mode == "implicit":
            budget = {} if device == "cuda" else {"memory_budget": "512MB"}  # CPU: streamed BLAS blocks

            def solve(it):
                return sl.sinkhorn_knopp_features(x, w, max_iter=it, **opts, **budget)
        else:
            setup, scores = timed(lambda: x @ w.transpose(-1, -2))

            def solve(it):
                return sl.sinkhorn_knopp(scores, max_iter=it, **opts)
        solve(1)  # warm-up: first-call costs (thread pools, first-touch pages) are not iterations
        times = [timed(lambda it=it: solve(it))[0] for it in iters]
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        q.put(({"solve_s": times, "setup_s": setup}, peak, None))
    except Exception as exc:  # reported in the table (e.g. out of memory for the materialised matrix)
        q.put((None, None, f"{type(exc).__name__}: {str(exc)[:120]}"))


def measure(mode: str, n: int, k: int, d: int, heads: int, device: str, dtype: torch.dtype, short: int, long: int,
            precision: str = "highest"):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, mode, n, k, d, heads, device, (short, long), dtype, precision))
    p.start()
    times, peak, err = q.get()
    p.join()
    if err:
        return {"mode": mode, "error": err}
    (t1, t2) = times["solve_s"]
    return {"mode": mode, "s_per_iter": (t2 - t1) / (long - short), "peak_bytes": peak,
            "setup_s": times["setup_s"], "solve_s": times["solve_s"], "iters": [short, long]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--d", type=int, nargs="+", default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--iters", type=int, nargs=2, default=(2, 12), help="the two run lengths to difference")
    ap.add_argument("--precision", choices=["highest", "high", "medium"], default=torch.get_float32_matmul_precision(),
                    help="torch.set_float32_matmul_precision for the runs (default: torch's current setting)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    n = args.n or (1_281_167 if gpu else 400_000)
    k = args.k or (3000 if gpu else 2000)
    heads = args.heads or (10 if gpu else 1)
    dims = args.d or ([128, 2048] if gpu else [64])
    rows = []
    for d in dims:
        for mode in ("implicit", "materialised"):
            r = measure(mode, n, k, d, heads, args.device, torch.float32, *args.iters, precision=args.precision)
            r.update(n=n, k=k, d=d, heads=heads, precision=args.precision)
            rows.append(r)
            shown = (f"{r['s_per_iter'] * 1e3:9.1f} ms/iter  setup {r['setup_s']:6.2f} s  "
                     f"peak {r['peak_bytes'] / 2**20:8.0f} MiB"
                     if "error" not in r else r["error"])
            print(f"N={n} K={k} D={d} H={heads} {args.precision} {mode:12s} {shown}", flush=True)
    materialised_bytes = heads * n * k * 4
    print(f"materialised f32 scores alone: {materialised_bytes / 2**20:.0f} MiB")
    if not args.no_save:
        day = dt.date.today().strftime("%Y%m%d")
        path = os.path.join(os.path.dirname(__file__), "results", f"implicit-{args.device}-{day}.json")
        save_json(path, {"machine": machine(args.device), "rows": rows, "materialised_bytes": materialised_bytes,
                         "command": " ".join(["python", "benchmarks/bench_implicit.py", *sys.argv[1:]])})
        print(f"-> {path}")


if __name__ == "__main__":
    main()
