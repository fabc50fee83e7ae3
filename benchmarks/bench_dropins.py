"""The drop-ins against the functions they replace, on CPU: SwAV's ``distributed_sinkhorn`` and
DINOv2's ``sinkhorn_knopp_teacher`` (one process, written here from their published code) vs
``selflabel.compat``, K = 3000 prototypes, 3 iterations, cosine scores as both methods produce.

    python benchmarks/bench_dropins.py                 # B = 256, 1024, 4096
    python benchmarks/bench_dropins.py --batch 256 --repeat 5 --no-save
    python benchmarks/bench_dropins.py --device cuda   # on a GPU, where SwAV and DINOv2 train

On a GPU it also times the two paths the drop-ins choose between (``selflabel.compat``): plain torch
ops for batches up to ``SMALL_GPU_ENTRIES`` entries, the fused Triton passes above.

Times are medians of ``--repeat`` interleaved calls; the outputs are compared entrywise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time

import torch

import selflabel.compat as compat
from selflabel.bench import machine
from selflabel.compat.dinov2 import sinkhorn_knopp_teacher
from selflabel.compat.swav import distributed_sinkhorn
from selflabel.distributed import Reducer
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


def cosines(b: int, k: int, d: int = 128, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return (z @ c.T).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, x: torch.Tensor, device: str, repeat: int) -> float:
    fn(x)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def gpu_paths(batches: list[int], k: int, repeat: int) -> list[dict]:
    """SwAV's setting (epsilon 0.05, 3 iterations) through each of the drop-ins' GPU paths."""

    def fused(x):
        saved, compat.SMALL_GPU_ENTRIES = compat.SMALL_GPU_ENTRIES, 0
        try:
            return compat.balanced_assignments(x, 20.0, 3)
        finally:
            compat.SMALL_GPU_ENTRIES = saved

    rows = []
    print(f"\n| B | torch ops ms | fused passes ms | default (up to {compat.SMALL_GPU_ENTRIES} entries: torch ops) |")
    print("|---|---|---|---|")
    for b in batches:
        x = cosines(b, k, device="cuda")
        small = median_ms(lambda y: compat._direct_small(y, 20.0, 3, Reducer()), x, "cuda", repeat)
        big = median_ms(fused, x, "cuda", repeat)
        default = "torch ops" if b * k <= compat.SMALL_GPU_ENTRIES else "fused"
        rows.append(dict(batch=b, k=k, torch_ops_ms=small, fused_ms=big, default=default))
        print(f"| {b} | {small:.3f} | {big:.3f} | {default} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cases = {
        "swav": (lambda x: published(x, 0.05, 3), lambda x: distributed_sinkhorn(x, 0.05, 3)),
        "dinov2": (lambda x: published(x.float(), 0.07, 3), lambda x: sinkhorn_knopp_teacher(x, 0.07, 3)),
    }
    rows = []
    print("| function | B | original ms | selflabel ms | ratio | max abs difference |")
    print("|---|---|---|---|---|---|")
    for name, (original, ours) in cases.items():
        for b in args.batch:
            x = cosines(b, args.k, device=args.device)
            diff = float((original(x) - ours(x)).abs().max())  # also the warm-up: CUDA context, compilation
            times: dict[str, list[float]] = {"original": [], "selflabel": []}
            for _ in range(args.repeat):
                for label, fn in (("original", original), ("selflabel", ours)):
                    sync(args.device)
                    t = time.perf_counter()
                    fn(x)
                    sync(args.device)
                    times[label].append(time.perf_counter() - t)
            o, s = (1e3 * statistics.median(times[key]) for key in ("original", "selflabel"))
            rows.append(dict(function=name, batch=b, k=args.k, original_ms=o, selflabel_ms=s, ratio=s / o,
                             max_abs_difference=diff))
            print(f"| {name} | {b} | {o:.2f} | {s:.2f} | {s / o:.2f} | {diff:.1e} |", flush=True)
    paths = gpu_paths(sorted(set(args.batch) | {16384}), args.k, args.repeat) if args.device == "cuda" else []
    if not args.no_save:
        stamp = dt.date.today().strftime("%Y%m%d")
        path = os.path.join(os.path.dirname(__file__), "results", f"dropins-{args.device}-{stamp}.json")
        save_json(path, {"machine": machine(args.device), "threads": torch.get_num_threads(), "rows": rows,
                         "gpu_paths": paths})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
