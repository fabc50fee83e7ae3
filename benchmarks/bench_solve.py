"""Time to solution of ``sinkhorn_knopp`` with its defaults (tol 1e-5, auto) on network-like
softmax scores, per size and dtype: what a user waits for, preparation included.

    python benchmarks/bench_solve.py                       # 20000x500 and 100000x1000, float32 and float64
    python benchmarks/bench_solve.py --sizes 50000x3000 --dead-fraction 0.01 --no-save

With ``--dead-fraction F`` each case is solved twice: healthy, and with a fraction F of the
clusters pushed away from all data (nobody prefers them: the case that breaks the plain scaling
form in float32); the last column then compares their time per iteration.

Best of ``--repeat`` runs. Writes JSON to benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time

import torch

import selflabel as sl
from selflabel.bench import machine
from selflabel.io import save_json
from selflabel.synthetic import make_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["20000x500", "100000x1000"])
    parser.add_argument("--lamb", type=float, default=25.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    rows = []
    print("| N x K | dtype | lamb | dead clusters | algorithm | iterations | seconds | ms / iteration | vs healthy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, k = (int(x) for x in size.split("x"))
        for dtype in (torch.float32, torch.float64):
            healthy_ms = None
            for dead in sorted({0, int(round(args.dead_fraction * k))}):
                scores = make_scores(n, k, kind="probs", seed=0, dtype=dtype, dead=dead)
                best, res = float("inf"), None
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    res = sl.sinkhorn_knopp(scores, kind="probs", lamb=args.lamb)
                    best = min(best, time.perf_counter() - t)
                ms = 1e3 * best / res.n_iter
                healthy_ms = ms if dead == 0 else healthy_ms
                row = dict(n=n, k=k, dtype=str(dtype).removeprefix("torch."), lamb=args.lamb, dead=dead,
                           algorithm=res.algorithm, iterations=res.n_iter, converged=res.converged, seconds=best,
                           ms_per_iteration=ms, vs_healthy=ms / healthy_ms)
                rows.append(row)
                print(f"| {n} x {k} | {row['dtype']} | {args.lamb:g} | {dead} | {res.algorithm} | {res.n_iter} | "
                      f"{best:.3f} | {ms:.2f} | {ms / healthy_ms:.2f} |", flush=True)
    if not args.no_save:
        stamp = dt.date.today().strftime("%Y%m%d")
        tag = f"-dead{args.dead_fraction:g}" if args.dead_fraction else ""
        path = os.path.join(os.path.dirname(__file__), "results", f"solve-cpu{tag}-{stamp}.json")
        save_json(path, {"machine": machine(), "lamb": args.lamb, "rows": rows})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
