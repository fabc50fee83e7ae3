"""Out-of-core speed: a float32 score matrix on disk larger than the memory budget.

Writes N x K float32 scores to a .npy file with ScoreStore (default N=2M, K=1000:
8 GB), then solves it with backend="chunked" and memory_budget (default 1 GB):
seconds per iteration (runs of 2 and 8 iterations, differenced) against the time to
read the file sequentially once (same run, the faster of a read before and one after
the solves), with a warm page cache and, where the kernel
lets us drop it (root, /proc/sys/vm/drop_caches), a cold one in which the source evicts
every block after reading it (SELFLABEL_DROP_PAGE_CACHE=1), so each pass reads the disk;
and peak RSS.

    python benchmarks/bench_ooc.py                    # 8 GB file in benchmarks/.ooc/ (deleted afterwards)
    python benchmarks/bench_ooc.py --n 200000 --k 500 --budget 100MB --no-save
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import resource
import time

import numpy as np
import torch

import selflabel as sl
from selflabel.io import save_json
from selflabel.source import parse_bytes
from selflabel.synthetic import make_scores


def write_scores(path: str, n: int, k: int) -> None:
    with sl.ScoreStore(path, n=n, k=k) as store:
        for lo in range(0, n, 100_000):
            store.append(make_scores(min(100_000, n - lo), k, seed=lo))


def read_file(path: str, block: int = 64 * 2**20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # the read-ahead hint the solver gives
        while fh.readinto(view):
            pass
    return time.perf_counter() - t


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def solve(path: str, budget: int, iters: int, algorithm: str) -> float:
    t = time.perf_counter()
    sl.sinkhorn_knopp(path, backend="chunked", memory_budget=budget, algorithm=algorithm, tol=0, max_iter=iters,
                      check_every=iters)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), ".ooc"))
    parser.add_argument("--algorithm", choices=["auto", "scaling", "log"], default="auto")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"scores-{args.n}x{args.k}.npy")
    size_gb = args.n * args.k * 4 / 1e9
    print(f"# bench_ooc: N={args.n}, K={args.k} float32 ({size_gb:.1f} GB), budget {budget / 1e9:.2f} GB, "
          f"algorithm {args.algorithm}")
    t = time.perf_counter()
    writer = mp.get_context("spawn").Process(target=write_scores, args=(path, args.n, args.k))
    writer.start()  # in a child, so this process's peak RSS measures the solve only
    writer.join()
    if writer.exitcode != 0:
        raise SystemExit("writing the score file failed")
    print(f"  wrote the file with ScoreStore in {time.perf_counter() - t:.1f}s")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"n": args.n, "k": args.k, "algorithm": args.algorithm, "file_bytes": os.path.getsize(path),
              "budget_bytes": budget}
    try:
        for cache in ("warm", "cold"):
            if cache == "cold":
                # every pass reads from disk: the source evicts each block after reading it
                os.environ["SELFLABEL_DROP_PAGE_CACHE"] = "1"
                if not drop_caches():
                    result["cold_note"] = "could not drop the page cache before the read (not root?)"
            read = read_file(path)
            if cache == "cold":
                drop_caches()
            short = solve(path, budget, 2, args.algorithm)
            long = solve(path, budget, 8, args.algorithm)
            per_iter = (long - short) / 6
            if cache == "cold":
                drop_caches()
            read = min(read, read_file(path))
            result[cache] = {"sequential_read_s": read, "s_per_iter": per_iter, "ratio_to_read": per_iter / read}
            print(f"  {cache} cache: read once {read:.2f}s ({os.path.getsize(path) / read / 1e9:.2f} GB/s), "
                  f"per iteration {per_iter:.2f}s = {per_iter / read:.2f}x a read")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(peak_rss_bytes=peak, rss_before_solving_bytes=base_rss,
                      rss_growth_over_budget_bytes=peak - base_rss - budget)
        print(f"  peak RSS {peak / 2**20:.0f} MiB (before solving {base_rss / 2**20:.0f} MiB; growth "
              f"{(peak - base_rss) / 2**20:.0f} MiB for a {budget / 2**20:.0f} MiB budget)")
    finally:
        os.unlink(path)
    if not args.no_save:
        result.update(benchmark="bench_ooc", date=dt.datetime.now().isoformat(timespec="seconds"),
                      torch=torch.__version__, numpy=np.__version__, threads=torch.get_num_threads())
        tag = "" if args.algorithm == "auto" else f"_{args.algorithm}"  # ooc-*.json stays the default run
        out = os.path.join(os.path.dirname(__file__), "results", f"ooc{tag}-{dt.date.today():%Y%m%d}.json")
        save_json(out, result)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
