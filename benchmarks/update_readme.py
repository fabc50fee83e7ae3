"""Regenerate README.md's Performance block (between the bench markers) from the
committed reports in benchmarks/results/: the newest cpu-*.json (bench_cpu.py),
ooc-*.json (bench_ooc.py), gpu-*.json (bench_gpu.py), and bench-cpu-report.md and
bench-cuda-report.md (``selflabel bench`` on each device)."""

from __future__ import annotations

import glob
import json
import os
import re

from selflabel.io import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")


def newest(pattern: str) -> str | None:
    files = sorted(glob.glob(os.path.join(HERE, "results", pattern)))
    return files[-1] if files else None


def block() -> str:
    out = []
    cpu = newest("cpu-*.json")
    if cpu:
        d = json.load(open(cpu))
        m = d["machine"]
        out += [f"One iteration at N = {d['n']:,}, K = {d['k']:,} on {m['cpu']}, {m['threads']} threads, "
                f"torch {m['torch']} (`make bench`, {os.path.basename(cpu)}):", "",
                "| solver | dtype | ms / iteration |", "|---|---|---|"]
        out += [f"| {r['solver']} | {r['dtype']} | {r['ms_per_iter']:.1f} |" for r in d["results"]]
        out += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in d["ratios"].items()) + ".", ""]
    ooc = newest("ooc-*.json")
    if ooc:
        d = json.load(open(ooc))
        parts = []
        for cache in ("warm", "cold"):
            if isinstance(d.get(cache), dict):
                c = d[cache]
                parts.append(f"{cache} page cache {c['s_per_iter']:.2f} s per iteration = "
                             f"{c['ratio_to_read']:.2f}x one sequential read ({c['sequential_read_s']:.2f} s)")
        growth = (d["peak_rss_bytes"] - d["rss_before_solving_bytes"]) / 2**20
        out += [f"Out of core (`benchmarks/bench_ooc.py`, {os.path.basename(ooc)}): N = {d['n']:,}, K = {d['k']:,} "
                f"float32 on disk ({d['file_bytes'] / 1e9:.1f} GB), budget {d['budget_bytes'] / 1e9:.1f} GB: "
                + "; ".join(parts) + f"; peak RSS grew {growth:.0f} MiB while solving.", ""]
    gpu = newest("gpu-*.json")
    if gpu:
        d = json.load(open(gpu))
        out += [f"One iteration on an {d['device']} (`python benchmarks/bench_gpu.py`, {os.path.basename(gpu)}, "
                f"torch {d['torch']}, CUDA events over 20 iterations after autotuning; GB/s counts one read of the "
                "matrix):", "", "| N x K | solver | dtype | ms / iteration | GB/s |", "|---|---|---|---|---|"]
        out += [f"| {r['n']} x {r['k']} | {r['solver']} | {r['dtype']} | {r['ms_per_iter']:.3f} | {r['GBps']:.0f} |"
                for r in d["results"]]
        out += [""]
    else:
        out += ["GPU timings (`benchmarks/bench_gpu.py`) are not measured yet.", ""]
    for device in ("cpu", "cuda"):
        suite = os.path.join(HERE, "results", f"bench-{device}-report.md")
        if not os.path.exists(suite):
            continue
        report = json.load(open(os.path.splitext(suite)[0] + ".json"))
        m = report["machine"]
        sizes = " ".join(f"{e['n']}x{e['k']}" for e in report["sizes"])
        where = (f"{m['threads']} threads on {m['cpu']}" if device == "cpu" else m["gpu"])
        out += [f"All solvers side by side (`selflabel bench --device {device} --sizes {sizes}`, "
                f"bench-{device}-report.json, plots in benchmarks/results/bench-{device}-report_*.png; {where}, "
                f"torch {m['torch']}, {report['date'][:10]}). "
                "Iterations to tol are the first power of two whose error is below 1e-4. The SwAV/DINOv2 row runs "
                "in SwAV's own regime (cosine scores, eps = 0.05), an easier problem than lamb = 25 on "
                "log-probabilities: compare its time per iteration, not its time to tol.", "",
                open(suite).read().strip(), ""]
    return "\n".join(out).rstrip("\n")


def main() -> None:
    text = open(README).read()
    new = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->",
                 lambda _: f"<!-- bench:start -->\n{block()}\n<!-- bench:end -->", text, flags=re.S)
    with atomic_write(README, "w") as fh:
        fh.write(new)


if __name__ == "__main__":
    main()
