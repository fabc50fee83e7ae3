"""Iterations of the training loop's relabelling: warm-started (as ``selflabel train`` runs it)
against cold, plain against accelerated, on the scores of a real run.

    python benchmarks/bench_warmstart.py                  # SeLa on digits, 10 epochs, seed 0
    python benchmarks/bench_warmstart.py --epochs 20 --seed 1 --no-save

Every time the loop relabels, its scores are also solved cold (no ``init``) and plain
(``acceleration="none"``), warm and cold; the training itself uses the warm accelerated
solve as always, so the run is the one ``selflabel train --threads 1`` makes. Prints a markdown table
and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile

import numpy as np

import selflabel.train.loop as loop
from selflabel.bench import machine
from selflabel.io import save_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    solve = loop.sinkhorn_knopp
    rows: list[dict] = []

    def measured(scores, **options):
        init = options.pop("init", None)
        runs = {}
        for name, acc, start in [("warm, accelerated", "auto", init), ("cold, accelerated", "auto", None),
                                 ("warm, plain", "none", init), ("cold, plain", "none", None)]:
            if start is None and name.startswith("warm"):
                continue  # the first labelling has nothing to start from
            runs[name] = solve(scores, init=start, acceleration=acc, **options)
        rows.append({name: {"n_iter": r.n_iter, "seconds": r.seconds, "converged": r.converged}
                     for name, r in runs.items()})
        return runs.get("warm, accelerated", runs["cold, accelerated"])

    loop.sinkhorn_knopp = measured
    try:
        with tempfile.TemporaryDirectory() as out:
            # one thread: the run (and so every count below) repeats whatever the load
            loop.train(method="sela", data="digits", epochs=args.epochs, seed=args.seed, out=out, progress=False,
                       tensorboard=False, threads=1)
    finally:
        loop.sinkhorn_knopp = solve
    names = ["warm, accelerated", "cold, accelerated", "warm, plain", "cold, plain"]
    print("| relabelling | " + " | ".join(f"{n}: iterations" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for i, row in enumerate(rows):
        print(f"| {i + 1} | " + " | ".join(str(row[n]["n_iter"]) if n in row else "" for n in names) + " |")
    later = rows[1:]  # the ones that had a warm start
    summary = {n: float(np.mean([r[n]["n_iter"] for r in later])) for n in names if later}
    print("mean over relabellings 2.." + str(len(rows)) + ": " + ", ".join(f"{n} {v:.1f}" for n, v in summary.items()))
    if not args.no_save:
        stamp = dt.datetime.now().strftime("%Y%m%d")
        save_json(os.path.join(RESULTS, f"warmstart-{stamp}.json"),
                  {"machine": machine(), "epochs": args.epochs, "seed": args.seed, "relabellings": rows,
                   "mean_after_first": summary})


if __name__ == "__main__":
    main()
