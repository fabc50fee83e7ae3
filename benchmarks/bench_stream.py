"""GPU out-of-core speed: a host-resident score matrix larger than the device budget,
streamed over PCIe in row blocks by the chunked backend (``device="cuda"``).

Builds an N x K float32 matrix in host memory (default N=4M, K=1000: 16 GB), measures
the host-to-device bandwidth of a plain pinned copy of the whole matrix in blocks of the
solver's size (the floor), then solves with ``backend="chunked", device="cuda",
memory_budget`` (default 2 GB of GPU memory) from a pinned tensor and from a plain
(pageable) tensor. Seconds per iteration are differenced over two run lengths; the
figure of merit is the matrix bytes per iteration / s_per_iter as % of the measured
pinned copy bandwidth (target >= 80%).

    python benchmarks/bench_stream.py               # writes benchmarks/results/stream-<gpu>-<date>.json
    python benchmarks/bench_stream.py --n 500000 --budget 512MB --no-save
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import torch

import selflabel as sl
from selflabel.backends.chunked import rows_for_budget
from selflabel.bench import machine
from selflabel.io import save_json
from selflabel.source import TensorSource, parse_bytes


def host_scores(n: int, k: int, pinned: bool) -> torch.Tensor:
    """Network-like log-probabilities, generated on the GPU block by block, kept on the host."""
    out = torch.empty(n, k, dtype=torch.float32, pin_memory=pinned)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for lo in range(0, n, 262_144):
        hi = min(n, lo + 262_144)
        x = torch.randn(hi - lo, k, device="cuda", generator=gen) * 3
        out[lo:hi].copy_(torch.log_softmax(x, dim=1))
    return out


def h2d_seconds(host: torch.Tensor, rows: int) -> float:
    """One pass of pinned host -> device copies of ``rows``-row blocks (what the solver moves)."""
    buf = torch.empty(rows, host.shape[1], dtype=host.dtype, device="cuda")
    buf.copy_(host[:rows], non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for lo in range(0, host.shape[0], rows):
        part = host[lo:lo + rows]
        buf[: part.shape[0]].copy_(part, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def solve_seconds(host: torch.Tensor, budget: int, algorithm: str, iters: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    sl.sinkhorn_knopp(host, kind="log_probs", backend="chunked", device="cuda", memory_budget=budget,
                      algorithm=algorithm, tol=0, max_iter=iters, check_every=iters)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--budget", default="2GB", help="GPU memory budget of the solver")
    ap.add_argument("--iters", type=int, nargs=2, default=(2, 6), help="the two run lengths to difference")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_stream needs a CUDA GPU")
    if not 0 < args.iters[0] < args.iters[1]:
        raise SystemExit(f"--iters needs two run lengths 0 < short < long, got {args.iters}")
    budget = parse_bytes(args.budget)
    name = torch.cuda.get_device_name().replace(" ", "-")
    out = (None if args.no_save else
           os.path.join(os.path.dirname(__file__), "results", f"stream-{name}-{dt.date.today():%Y%m%d}.json"))
    command = " ".join(["python", "benchmarks/bench_stream.py", *sys.argv[1:]])

    def save(result: dict) -> None:
        if out:
            save_json(out, {**result, "machine": machine("cuda"), "command": command})

    nbytes = args.n * args.k * 4
    print(f"# bench_stream: N={args.n} K={args.k} float32 on the host ({nbytes / 1e9:.1f} GB), "
          f"GPU budget {budget / 1e9:.2f} GB, {torch.cuda.get_device_name()}", flush=True)
    rows = None
    result = {"n": args.n, "k": args.k, "matrix_bytes": nbytes, "budget_bytes": budget, "runs": []}
    for pinned in (True, False):
        t = time.perf_counter()
        host = host_scores(args.n, args.k, pinned)
        print(f"  {'pinned' if pinned else 'pageable'} host matrix built in {time.perf_counter() - t:.1f}s", flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the solver's own peak from here
        if rows is None:
            rows = rows_for_budget(TensorSource(host), torch.float32, budget)
            copy_s = min(h2d_seconds(host, rows) for _ in range(3))
            result.update(rows_per_block=rows, h2d_pinned_s=copy_s, h2d_pinned_gbps=nbytes / copy_s / 1e9)
            print(f"  pinned H2D copy in {rows}-row blocks: {copy_s:.3f}s per pass = {nbytes / copy_s / 1e9:.1f} GB/s",
                  flush=True)
        for algorithm in ("scaling", "log"):
            solve_seconds(host, budget, algorithm, 1)  # warm-up: Triton autotuning, staging buffers
            short, long = (solve_seconds(host, budget, algorithm, it) for it in args.iters)
            per_iter = (long - short) / (args.iters[1] - args.iters[0])
            pct = 100 * result["h2d_pinned_s"] / per_iter
            result["runs"].append({"host": "pinned" if pinned else "pageable", "algorithm": algorithm,
                                   "s_per_iter": per_iter, "gbps": nbytes / per_iter / 1e9, "pct_of_h2d": pct})
            print(f"  {'pinned' if pinned else 'pageable':8s} {algorithm:7s} {per_iter:.3f}s/iter = "
                  f"{nbytes / per_iter / 1e9:.1f} GB/s = {pct:.0f}% of the pinned copy", flush=True)
            save(result)  # kept as it goes: a run cut short still leaves its figures
        result[f"peak_gpu_bytes_{'pinned' if pinned else 'pageable'}"] = torch.cuda.max_memory_allocated()
        save(result)
        del host
    if out:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
