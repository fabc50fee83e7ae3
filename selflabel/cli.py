"""Command line: ``selflabel label``, ``selflabel demo``, ``selflabel bench``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .io import save_npy
from .solver import ALGORITHMS, KINDS, sinkhorn_knopp


def _label(args: argparse.Namespace) -> int:
    res = sinkhorn_knopp(
        args.scores, lamb=args.lamb, kind=args.kind, dtype=args.dtype, algorithm=args.algorithm,
        backend=args.backend, tol=args.tol, max_iter=args.max_iter, progress=not args.quiet,
        memory_budget=args.memory_budget,
    )
    labels = res.labels.cpu().numpy()
    save_npy(args.out, labels)
    sizes = np.bincount(labels.reshape(-1, labels.shape[-1])[0], minlength=res.log_v.shape[-1])
    print(f"labelled {labels.shape[-1]} samples into {sizes.size} clusters: {res.n_iter} iterations, "
          f"error {res.error:.2e}, {'converged' if res.converged else 'NOT converged'}, {res.seconds:.2f}s "
          f"({res.backend}/{res.algorithm}); cluster sizes min {sizes.min()} max {sizes.max()} -> {args.out}")
    return 0 if res.converged else 3


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(n=args.n, k=args.k, lamb=args.lamb)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selflabel", description="Fast Sinkhorn-Knopp self-labelling (SeLa).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="label a saved score matrix (.npy)")
    p.add_argument("scores", help="(N, K) or (H, N, K) .npy file of scores")
    p.add_argument("--out", required=True, help="where to write the int64 labels (.npy, written atomically)")
    p.add_argument("--kind", choices=KINDS, default="logits")
    p.add_argument("--lamb", type=float, default=25.0)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--memory-budget", default=None,
                   help="stream the file in row blocks within this budget, e.g. 1GB (backend 'chunked')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)

    d = sub.add_parser("demo", help="label a generated network-like score matrix with every backend")
    d.add_argument("--n", type=int, default=50_000)
    d.add_argument("--k", type=int, default=500)
    d.add_argument("--lamb", type=float, default=25.0)
    d.set_defaults(func=_demo)

    from .bench import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"selflabel: error: {exc}", file=sys.stderr)
        return 2


