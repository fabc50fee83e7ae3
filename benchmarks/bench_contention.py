"""Speed on a busy machine: per-iteration time of the CPU backend at 1 and 2 threads (and the torch
backend) while one busy-loop process per core competes for the cores, as DataLoader workers do
during training; then a short digits ``selflabel train`` on 1 thread and on 2 (every step on
both, and each step on both or one as measured, the default) under the same load. The same
figures on the quiet machine are measured first.

    python benchmarks/bench_contention.py                  # about 10 minutes on 2 cores
    python benchmarks/bench_contention.py --no-train --sizes 500x10 20000x500 --no-save

Per-iteration time is the difference of two solves of different lengths (set-up cancels),
the median of ``--repeat`` interleaved measurements. The busy loops stop by themselves after
``--load-seconds`` (an hour: longer than the busy rows) and are killed when the busy rows end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import selflabel as sl
from selflabel.bench import machine
from selflabel.io import save_json
from selflabel.synthetic import make_scores

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


@contextlib.contextmanager
def busy_cores(count: int, seconds: float):
    """``count`` busy-loop processes, each bounded to ``seconds``."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def per_iteration(scores: torch.Tensor, backend: str, threads: int, short: int, long: int) -> float:
    torch.set_num_threads(threads)
    try:
        def run(n: int) -> float:
            t = time.perf_counter()
            sl.sinkhorn_knopp(scores, backend=backend, tol=0, max_iter=n, check_every=n)
            return time.perf_counter() - t

        return (run(long) - run(short)) / (long - short)
    finally:
        torch.set_num_threads(2)


def solver_rows(sizes: list[str], repeat: int) -> list[dict]:
    rows = []
    for size in sizes:
        n, k = (int(x) for x in size.split("x"))
        scores = make_scores(n, k, seed=0)
        long = max(20, min(400, int(4e8 / (n * k))))
        variants = [("cpu", 1), ("cpu", 2), ("torch", 2)]
        times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        for _ in range(repeat):  # interleaved, so drifts of the load hit every variant alike
            for backend, threads in variants:
                times[(backend, threads)].append(per_iteration(scores, backend, threads, long // 4, long))
        for (backend, threads), ts in times.items():
            rows.append(dict(n=n, k=k, backend=backend, threads=threads, ms=1e3 * statistics.median(ts)))
    return rows


TRAIN_VARIANTS = (("1", 1, []), ("2 fixed", 2, ["--threads", "2"]), ("2 measured", 2, []))


def train_seconds(threads: int, extra: list[str], epochs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "selflabel", "train", "--epochs", str(epochs), "--out", out, "--quiet",
                        "--no-tensorboard", "--device", "cpu", *extra], check=True, env=env, capture_output=True)
        return time.perf_counter() - t


def train_rows(load: str, epochs: int, repeat: int) -> list[dict]:
    """Whole ``selflabel train`` runs: OMP_NUM_THREADS=1; 2 with ``--threads 2`` (every step on
    both); 2 with the default ``--threads 0`` (each step on both or one, as measured). Interleaved;
    the median of ``repeat`` runs each."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in TRAIN_VARIANTS}
    for _ in range(repeat):
        for name, threads, extra in TRAIN_VARIANTS:
            times[name].append(train_seconds(threads, extra, epochs))
    return [dict(load=load, threads=name, seconds=statistics.median(ts), runs=ts) for name, ts in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["500x10", "20000x500", "200000x500"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--load-seconds", type=float, default=3600.0,
                        help="bound on each busy loop's life (they are killed when the busy rows end)")
    parser.add_argument("--loads", nargs="+", choices=["quiet", "busy"], default=["quiet", "busy"])
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--train-repeat", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out", help="the JSON to write (default results/contention-DATE.json)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    report = {"machine": machine(), "busy_processes": cores, "rows": [], "train": []}
    for load in args.loads:
        ctx = busy_cores(cores, args.load_seconds) if load == "busy" else contextlib.nullcontext()
        with ctx:
            for row in solver_rows(args.sizes, args.repeat):
                report["rows"].append({**row, "load": load})
            if not args.no_train:
                report["train"] += train_rows(load, args.epochs, args.train_repeat)
    print("| load | N x K | cpu 1 thread ms | cpu 2 threads ms | torch 2 threads ms | cpu 2 / cpu 1 |")
    print("|---|---|---|---|---|---|")
    for load in args.loads:
        for size in args.sizes:
            n, k = (int(x) for x in size.split("x"))
            got = {(r["backend"], r["threads"]): r["ms"] for r in report["rows"]
                   if r["load"] == load and r["n"] == n and r["k"] == k}
            print(f"| {load} | {n} x {k} | {got[('cpu', 1)]:.3f} | {got[('cpu', 2)]:.3f} | {got[('torch', 2)]:.3f} | "
                  f"{got[('cpu', 2)] / got[('cpu', 1)]:.2f} |")
    for t in report["train"]:
        print(f"train {args.epochs} epochs, {t['load']}, threads {t['threads']}: median {t['seconds']:.1f} s "
              f"({', '.join(f'{x:.1f}' for x in t['runs'])})")
    if not args.no_save:
        stamp = dt.date.today().strftime("%Y%m%d")
        path = args.out or os.path.join(os.path.dirname(__file__), "results", f"contention-{stamp}.json")
        save_json(path, report)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
