"""Learning quality of ``selflabel train``: SeLa and CARP over seeds on the embedded digit sets.

    python benchmarks/bench_learning.py                                  # both methods, digits and mnist5k, seeds 0-2
    python benchmarks/bench_learning.py --methods sela --train-args "--views 1" --tag views1   # an ablation

Each run is ``python -m selflabel train --method M --data D --seed S --threads T`` with the dataset's
defaults (plus ``--train-args``), in a fresh process, timed from start to exit. ``--threads`` is fixed
(default: torch's count) so that a seed's run repeats bit for bit. The table gives, per run, the
final labels' NMI/ARI/Hungarian accuracy against the classes, the network's own argmax NMI, 20-NN
and linear-probe accuracy of the features (5-fold), k-means (10 restarts) on the raw pixels of the
same run, and the margin over it; then the mean per dataset and method. Writes
benchmarks/results/learning-DATE[-TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from selflabel.bench import machine
from selflabel.io import atomic_write, save_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_one(method: str, data: str, seed: int, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "selflabel", "train", "--method", method, "--data", data, "--seed", str(seed),
               "--threads", str(threads), "--out", out, "--quiet", "--no-tensorboard", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.json")) as fh:
            saved = json.load(fh)
    m, cfg = saved["metrics"], saved["config"]
    km = m["kmeans_features"]
    row = {"data": data, "method": method, "seed": seed, "seconds": seconds, "arch": cfg["arch"],
           "epochs": cfg["epochs"], "ncl": cfg["ncl"], "views": cfg.get("views"), "carp_block": cfg["carp_block"],
           "carp_blocks": cfg.get("carp_blocks"), "holdout": cfg.get("holdout", 0.0), "command": shlex.join(cmd[1:]),
           "nmi": m["labels"]["nmi"], "ari": m["labels"]["ari"], "acc": m["labels"]["acc"],
           "m2o_acc": m["labels"]["m2o_acc"], "argmax_nmi": m["argmax"]["nmi"], "kmeans_features_nmi": km["nmi"],
           "kmeans_features_acc": km["acc"], "kmeans_library": km["library"], "knn_acc": m["features"]["knn_acc"],
           "linear_acc": m["features"]["linear_acc"], "kmeans_pixels_nmi": m["kmeans_pixels"]["nmi"],
           "margin": m["labels"]["nmi"] - m["kmeans_pixels"]["nmi"]}
    if "heldout" in km:
        row.update(heldout_kmeans_nmi=km["heldout"]["nmi"], heldout_argmax_nmi=m["argmax"]["heldout"]["nmi"],
                   heldout_argmax_m2o_acc=m["argmax"]["heldout"]["m2o_acc"])
    return row


def table(rows: list[dict]) -> str:
    """Per run: the labels (NMI, ARI, Hungarian and many-to-one accuracy), the head's argmax, k-means on the
    features, probes, k-means on pixels and the margin of the labels over it; held-out columns when run so.
    Then the means per dataset and method."""
    held = all("heldout_kmeans_nmi" in r for r in rows)
    head = ("| data | method | K | blocks x size | seed | NMI | ARI | acc | m2o acc | argmax NMI | k-means feats NMI "
            "| kNN acc | linear acc | k-means pixels NMI | margin |" + (" held-out k-means NMI | held-out argmax NMI "
                                                                       "| held-out argmax m2o acc |" if held else "")
            + " seconds |\n" + "|---" * (16 + 3 * held) + "|\n")
    body = ""
    for r in rows:
        blocks = f"{r['carp_blocks'] or r['ncl'] // r['carp_block']} x {r['carp_block']}" if r["method"] == "carp" \
            else "-"
        body += (f"| {r['data']} | {r['method']} | {r['ncl']} | {blocks} | {r['seed']} | {r['nmi']:.3f} "
                 f"| {r['ari']:.3f} | {r['acc']:.3f} | {r['m2o_acc']:.3f} | {r['argmax_nmi']:.3f} "
                 f"| {r['kmeans_features_nmi']:.3f} "
                 f"| {r['knn_acc']:.3f} | {r['linear_acc']:.3f} | {r['kmeans_pixels_nmi']:.3f} | {r['margin']:+.3f} |")
        if held:
            body += (f" {r['heldout_kmeans_nmi']:.3f} | {r['heldout_argmax_nmi']:.3f} "
                     f"| {r['heldout_argmax_m2o_acc']:.3f} |")
        body += f" {r['seconds']:.0f} |\n"
    means = ("\n| data | method | mean NMI | min NMI | mean k-means feats NMI | min k-means feats NMI "
             "| mean k-means pixels NMI | min margin | mean acc | mean kNN acc | mean seconds | max seconds |\n"
             + "|---" * 12 + "|\n")
    for key in dict.fromkeys((r["data"], r["method"]) for r in rows):
        group = [r for r in rows if (r["data"], r["method"]) == key]
        col = {k: np.array([r[k] for r in group]) for k in group[0] if isinstance(group[0][k], float)}
        means += (f"| {key[0]} | {key[1]} | {col['nmi'].mean():.3f} | {col['nmi'].min():.3f} "
                  f"| {col['kmeans_features_nmi'].mean():.3f} | {col['kmeans_features_nmi'].min():.3f} "
                  f"| {col['kmeans_pixels_nmi'].mean():.3f} | {col['margin'].min():+.3f} | {col['acc'].mean():.3f} "
                  f"| {col['knn_acc'].mean():.3f} | {col['seconds'].mean():.0f} | {col['seconds'].max():.0f} |\n")
    return head + body + means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "mnist5k"], help="datasets (default: both)")
    parser.add_argument("--methods", nargs="+", default=["sela", "carp"], choices=["sela", "carp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of every run, fixed so that runs repeat (default: torch's count)")
    parser.add_argument("--train-args", default="", help="more options for every `selflabel train`, one string")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. the ablation's name)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    extra = shlex.split(args.train_args)
    rows = []
    for data in args.data:
        for method in args.methods:
            for seed in args.seeds:
                row = run_one(method, data, seed, args.threads, extra)
                rows.append(row)
                print(f"{data} {method} seed {seed}: NMI {row['nmi']:.3f} (k-means on pixels "
                      f"{row['kmeans_pixels_nmi']:.3f}), kNN {row['knn_acc']:.3f}, {row['seconds']:.0f}s", flush=True)
    text = table(rows)
    print("\n" + text)
    if args.no_save:
        return
    name = f"learning-{dt.date.today():%Y%m%d}" + (f"-{args.tag}" if args.tag else "")
    meta = {"machine": machine(), "threads": args.threads, "train_args": args.train_args,
            "command": shlex.join(["python", "benchmarks/bench_learning.py", *sys.argv[1:]])}
    save_json(os.path.join(RESULTS, name + ".json"), {**meta, "runs": rows})
    with atomic_write(os.path.join(RESULTS, name + ".md"), "w") as fh:
        fh.write(f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['platform']}), torch "
                 f"{meta['machine']['torch']}, {args.threads} torch threads\n\n{text}")
    print(f"wrote {os.path.join(RESULTS, name)}.{{json,md}}")


if __name__ == "__main__":
    main()
