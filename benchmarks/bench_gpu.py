"""GPU speed of one Sinkhorn iteration: selflabel's Triton kernels against peers.

Sizes: N=1.28M, K=3000 (SeLa on ImageNet) and N=100k, K=1000, float32 and float64.
Per-iteration time is measured with CUDA events over a run of iterations of each
pass, after a warm-up (autotuning included). Achieved bandwidth = bytes of the
matrix read per iteration / time; the floor is a device-to-device copy measured
in the same run (a copy reads and writes, so its read bandwidth is 2 bytes/byte).

    python benchmarks/bench_gpu.py                  # writes benchmarks/results/gpu-<device>-<date>.json
    python benchmarks/bench_gpu.py --sizes 100000x1000 --no-save
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import torch

from selflabel import peers
from selflabel.backends.triton import TritonBackend
from selflabel.io import save_json


def cuda_time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def bench_dtype(logits: torch.Tensor, dtype: torch.dtype, lamb: float, iters: int) -> list[dict]:
    n, k = logits.shape
    name = str(dtype).split(".")[-1]
    be = TritonBackend()
    s = logits.to(dtype)[None]
    nbytes = s.numel() * s.element_size()
    rows = []

    def row(solver: str, seconds: float, **extra) -> None:
        rows.append({"n": n, "k": k, "dtype": name, "solver": solver, "ms_per_iter": seconds * 1e3,
                     "GBps": nbytes / seconds / 1e9, **extra})
        print(f"  N={n} K={k} {name:8s} {solver:38s} {seconds * 1e3:8.3f} ms  {nbytes / seconds / 1e9:7.0f} GB/s",
              flush=True)

    dst = torch.empty_like(s)
    copy = cuda_time(lambda: dst.copy_(s), iters)
    read_bw = 2 * nbytes / copy  # a copy moves every byte twice
    row("device copy (bandwidth floor)", copy / 2, note="half a copy: one read of the matrix")
    dst = None
    M = be.prepare(s, lamb, False, True).mat
    a = torch.full((n,), 1.0 / n, dtype=dtype, device="cuda")
    u = a[None].clone()
    v = torch.ones(1, k, dtype=dtype, device="cuda")
    t = cuda_time(lambda: be.scaling_pass(M, a, u, v), iters)
    row("selflabel fused scaling (triton)", t, pct_of_floor=100 * nbytes / t / read_bw)
    row("torch two-matvec loop", cuda_time(lambda: peers.torch_matvec(M[0], 1), iters))
    M = None
    L = be.prepare(s, lamb, False, False).mat
    log_a = torch.log(a)
    f = log_a[None].clone()
    g = torch.zeros(1, k, dtype=dtype, device="cuda")
    row("selflabel fused log-domain (triton)", cuda_time(lambda: be.log_pass(L, log_a, f, g), iters))
    L = None
    if dtype == torch.float32:
        cos = s[0] / s[0].abs().amax()
        one = cuda_time(lambda: peers.swav_inplace(cos, 0.05, 1), iters)
        four = cuda_time(lambda: peers.swav_inplace(cos, 0.05, 4), iters)
        row("SwAV in-place", (four - one) / 3)
    torch.cuda.empty_cache()
    return rows


def bench_size(n: int, k: int, lamb: float, iters: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, k, device="cuda", generator=gen) * 3
    return [r for dtype in (torch.float32, torch.float64) for r in bench_dtype(logits, dtype, lamb, iters)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["1280000x3000", "100000x1000"])
    parser.add_argument("--lamb", type=float, default=25.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    device = torch.cuda.get_device_name()
    print(f"# bench_gpu on {device}")
    rows = []
    for size in args.sizes:
        n, k = (int(x) for x in size.split("x"))
        rows += bench_size(n, k, args.lamb, args.iters)
    if not args.no_save:
        tag = device.lower().replace("nvidia", "").strip().split()[0]
        path = os.path.join(os.path.dirname(__file__), "results", f"gpu-{tag}-{dt.date.today():%Y%m%d}.json")
        save_json(path, {"benchmark": "bench_gpu", "device": device, "torch": torch.__version__,
                       "date": dt.datetime.now().isoformat(timespec="seconds"), "results": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
