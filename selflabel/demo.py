"""``selflabel demo``: label a generated network-like score matrix with every backend."""

from __future__ import annotations

import time

import numpy as np
import torch

from .solver import sinkhorn_knopp
from .synthetic import make_scores


def _histogram(sizes: np.ndarray, bins: int = 8, width: int = 40) -> str:
    counts, edges = np.histogram(sizes, bins=bins)
    lines = []
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "#" * int(round(width * c / max(1, counts.max())))
        lines.append(f"  {lo:8.1f} - {hi:8.1f} | {bar} {c}")
    return "\n".join(lines)


def run_demo(n: int = 50_000, k: int = 500, lamb: float = 25.0) -> None:
    print(f"selflabel demo: {n} samples x {k} clusters of softmax probabilities (SeLa's input), lamb={lamb}, "
          f"{torch.get_num_threads()} threads")
    t = time.perf_counter()
    probs = make_scores(n, k, kind="probs", dead=k // 20, dead_margin=1.0, seed=0)
    print(f"generated scores in {time.perf_counter() - t:.1f}s ({k // 20} clusters no sample prefers)")
    raw = probs.argmax(1).bincount(minlength=k).numpy()
    print(f"argmax of the raw scores: cluster sizes min {raw.min()}, max {raw.max()}, "
          f"{int((raw == 0).sum())} empty clusters")

    runs = [("cpu", "auto", torch.float32), ("cpu", "log", torch.float32), ("cpu", "auto", torch.float64),
            ("cpu", "scaling", torch.float64), ("torch", "auto", torch.float64)]
    ref = None
    print(f"\n{'backend':8s} {'algorithm':14s} {'dtype':8s} {'iters':>6s} {'error':>9s} {'seconds':>8s} "
          f"{'ms/iter':>8s} {'same labels':>11s}")
    for backend, algorithm, dtype in runs:
        res = sinkhorn_knopp(probs, kind="probs", lamb=lamb, backend=backend, algorithm=algorithm, dtype=dtype)
        # per-iteration cost: two fixed-length runs, differenced (removes the set-up cost)
        fixed = {}
        for iters in (10, 40):
            t = time.perf_counter()
            sinkhorn_knopp(probs, kind="probs", lamb=lamb, backend=backend, algorithm=algorithm, dtype=dtype,
                           tol=0, max_iter=iters)
            fixed[iters] = time.perf_counter() - t
        per_iter = (fixed[40] - fixed[10]) / 30
        labels = res.labels.numpy()
        ref = labels if ref is None else ref
        used = algorithm if algorithm != "auto" else f"auto->{res.algorithm}"
        print(f"{backend:8s} {used:14s} {str(dtype).split('.')[-1]:8s} {res.n_iter:6d} {res.error:9.2e} "
              f"{res.seconds:8.2f} {per_iter * 1e3:8.2f} {100 * (labels == ref).mean():10.2f}%")
    sizes = np.bincount(ref, minlength=k)
    print(f"\nbalanced labels (cpu, float32): cluster sizes min {sizes.min()}, median "
          f"{int(np.median(sizes))}, max {sizes.max()} (target {n / k:.0f} each)")
    print(_histogram(sizes))
