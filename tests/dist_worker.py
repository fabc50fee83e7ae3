"""Worker for the spawned torch.distributed tests (imported by the child processes)."""

from __future__ import annotations

import datetime
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

import selflabel as sl
from selflabel.synthetic import make_scores

N, K, LAMB = 301, 7, 20.0


def offsets(shards: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(shards)]).tolist()


def _solve(x, **kw):
    r = sl.sinkhorn_knopp(x, lamb=LAMB, process_group=dist.group.WORLD, **kw)
    return {"labels": r.labels.numpy(), "log_u": r.log_u.numpy(), "log_v": r.log_v.numpy(), "n_iter": r.n_iter,
            "converged": r.converged, "algorithm": r.algorithm}


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# Options that differ between the ranks (rank 0's value, rank 1's value): every one must make
# every rank raise a ValueError naming it, with no hang and no abort.
MISMATCHES = {
    "dtype": (torch.float64, torch.float32), "max_iter": (100, 101), "check_every": (10, 5),
    "algorithm": ("scaling", "log"), "tol": (1e-6, 1e-7), "lamb": (20.0, 21.0), "kind": ("logits", "log_probs"),
    "criterion": ("marginal", "sela"), "col_marginal": (None, np.full(K, 1.0 / K)),
    "init": (None, np.zeros(K)), "gather_labels": (False, True), "acceleration": ("auto", "none"),
}


class InjectedFailure(RuntimeError):
    pass


def _failing_source(block: torch.Tensor, fail_at: int | None):
    """A chunk function whose pass number ``fail_at`` raises (None: never)."""
    calls = [0]

    def source():
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise InjectedFailure(f"disk error on pass {fail_at}")
        return iter([block])

    return source


def run(rank: int, world: int, port: int, shards: list[int], queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        lo, hi = offsets(shards)[rank : rank + 2]
        full = make_scores(N, K, temperature=3.0, dead=1, dead_margin=0.5, dtype=torch.float64, seed=1)
        out = {}
        for algorithm in ("scaling", "log"):
            out[algorithm] = _solve(full[lo:hi], algorithm=algorithm, tol=1e-10, max_iter=50_000,
                                    gather_labels=True)
            out[f"{algorithm}_plain"] = _solve(full[lo:hi], algorithm=algorithm, tol=1e-10, max_iter=50_000,
                                               acceleration="none")
        heads = make_scores(N, K, temperature=3.0, heads=2, dtype=torch.float64, seed=2)
        out["heads"] = _solve(heads[:, lo:hi], tol=1e-10, max_iter=50_000)
        weights = np.linspace(1.0, 2.0, N)[lo:hi]  # unnormalised on purpose: the global total is 451.5
        out["weighted"] = _solve(full[lo:hi], row_marginal=weights / 451.5, tol=1e-10, max_iter=50_000)
        bad = full[lo:hi].clone()
        if rank == 1:
            bad[0, 0] = float("nan")
        out["nan"] = _error(lambda: _solve(bad))
        out["mismatched_k"] = _error(lambda: _solve(full[lo:hi, : K - (rank == 1)]))
        out["one_sided_marginal"] = _error(lambda: _solve(full[lo:hi], row_marginal=np.ones(hi - lo) / N
                                                          if rank == 0 else None))
        for name, values in MISMATCHES.items():
            out[f"mismatch_{name}"] = _error(lambda name=name, values=values: sl.sinkhorn_knopp(
                full[lo:hi], process_group=dist.group.WORLD, **{"lamb": LAMB, name: values[min(rank, 1)]}))
        for algorithm in ("scaling", "log"):  # rank 1's source fails in the middle of the solve
            t0 = time.perf_counter()
            out[f"midsolve_{algorithm}"] = _error(lambda algorithm=algorithm: sl.sinkhorn_knopp(
                _failing_source(full[lo:hi], 8 if rank == 1 else None), backend="chunked", lamb=LAMB,
                algorithm=algorithm, tol=0, max_iter=50, process_group=dist.group.WORLD))
            out[f"midsolve_{algorithm}_seconds"] = time.perf_counter() - t0
        out["after_errors"] = _solve(full[lo:hi], tol=1e-8)  # the group still works
        queue.put((rank, out))
    except Exception:  # report instead of hanging the parent
        queue.put((rank, {"crash": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
