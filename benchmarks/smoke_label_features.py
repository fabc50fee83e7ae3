"""Smoke check of ``selflabel label --prototypes`` on one device, through the CLI as a user runs it:
the fused path (features on the device), the chunked path (score blocks streamed within
--memory-budget) and the CPU path label the same features; prints their label agreement.

    python benchmarks/smoke_label_features.py --device cuda     # in benchmarks/gpu_session.sh
    python benchmarks/smoke_label_features.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    gen = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        x, w = os.path.join(tmp, "x.npy"), os.path.join(tmp, "w.npy")
        np.save(x, gen.standard_normal((args.n, 64), dtype=np.float32))
        np.save(w, gen.standard_normal((3, 100, 64), dtype=np.float32) / 8)
        runs = {"fused": ["--device", args.device], "chunked": ["--device", args.device, "--memory-budget", "200MB"],
                "cpu": ["--device", "cpu"]}
        labels = {}
        for name, extra in runs.items():
            out = os.path.join(tmp, f"{name}.npy")
            cmd = [sys.executable, "-m", "selflabel", "label", x, "--prototypes", w, "--lamb", "5", "--quiet",
                   "--out", out, *extra]
            done = subprocess.run(cmd, capture_output=True, text=True)
            print(f"{name}: rc={done.returncode} {done.stdout.strip()} {done.stderr.strip()[-500:]}")
            if done.returncode == 0:
                labels[name] = np.load(out)
        for name in ("fused", "chunked"):
            if name in labels and "cpu" in labels:
                print(f"label agreement {name} vs cpu: {(labels[name] == labels['cpu']).mean():.4f}")


if __name__ == "__main__":
    main()
