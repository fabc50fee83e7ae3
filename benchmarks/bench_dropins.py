"""The drop-ins against the functions they replace, on CPU: SwAV's ``distributed_sinkhorn`` and
DINOv2's ``sinkhorn_knopp_teacher`` (one process, written here from their published code) vs
``selflabel.compat``, K = 3000 prototypes, 3 iterations, cosine scores as both methods produce.

    python benchmarks/bench_dropins.py                 # B = 256, 1024, 4096
    python benchmarks/bench_dropins.py --batch 256 --repeat 5 --no-save

Times are medians of ``--repeat`` interleaved calls; the outputs are compared entrywise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time

import torch

from selflabel.bench import machine
from selflabel.compat.dinov2 import sinkhorn_knopp_teacher
from selflabel.compat.swav import distributed_sinkhorn
from selflabel.io import save_json


@torch.no_grad()
def published(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process (DINOv2's teacher function is the same loop on
    float32 teacher outputs): exp, normalise by the total, then per iteration divide the
    prototypes' sums and the samples' sums in place."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def cosines(b: int, k: int, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    cases = {
        "swav": (lambda x: published(x, 0.05, 3), lambda x: distributed_sinkhorn(x, 0.05, 3)),
        "dinov2": (lambda x: published(x.float(), 0.07, 3), lambda x: sinkhorn_knopp_teacher(x, 0.07, 3)),
    }
    rows = []
    print("| function | B | original ms | selflabel ms | ratio | max abs difference |")
    print("|---|---|---|---|---|---|")
    for name, (original, ours) in cases.items():
        for b in args.batch:
            x = cosines(b, args.k)
            diff = float((original(x) - ours(x)).abs().max())
            times: dict[str, list[float]] = {"original": [], "selflabel": []}
            for _ in range(args.repeat):
                for label, fn in (("original", original), ("selflabel", ours)):
                    t = time.perf_counter()
                    fn(x)
                    times[label].append(time.perf_counter() - t)
            o, s = (1e3 * statistics.median(times[key]) for key in ("original", "selflabel"))
            rows.append(dict(function=name, batch=b, k=args.k, original_ms=o, selflabel_ms=s, ratio=s / o,
                             max_abs_difference=diff))
            print(f"| {name} | {b} | {o:.2f} | {s:.2f} | {s / o:.2f} | {diff:.1e} |", flush=True)
    if not args.no_save:
        stamp = dt.date.today().strftime("%Y%m%d")
        path = os.path.join(os.path.dirname(__file__), "results", f"dropins-cpu-{stamp}.json")
        save_json(path, {"machine": machine(), "threads": torch.get_num_threads(), "rows": rows})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
