"""Time to solution: plain against over-relaxed Sinkhorn-Knopp, and against SeLa's own code.

    python benchmarks/bench_convergence.py --sela-repo /path/to/self-label   # the full run
    python benchmarks/bench_convergence.py --quick --no-save                  # small sizes, a smoke run

Per case (network-like softmax scores from ``selflabel.synthetic``):

- a float64 reference: plain Sinkhorn-Knopp (``acceleration="none"``) to tol 1e-9, whose
  labels every other run is compared with;
- ``acceleration="none"`` and ``"auto"``, one solve each to tol 1e-7 (or the case's
  iteration cap), with the wall time of every check (preparation included): iterations
  and seconds to the marginal error 1e-3, 1e-5 and 1e-7 are read off that one run;
- ``criterion="sela"`` (SeLa's stopping rule, 0.1), plain and accelerated, timed whole
  (labels included);
- SeLa's ``optimize_L_sk`` (github.com/yukimasano/self-label, ``sinkhornknopp.py``),
  imported from ``--sela-repo`` and run on the same float64 probabilities, timed whole.
  SeLa's ``util`` imports ``torchvision.utils``, which ``optimize_L_sk`` never uses: without
  torchvision a stand-in module is registered. Without ``--sela-repo`` the row is left out.

Writes JSON, a markdown table and one plot per case (error against time, log scales) to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import re
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import torch

import selflabel as sl
from selflabel import iterate as core
from selflabel.bench import machine
from selflabel.io import atomic_write, save_json
from selflabel.synthetic import make_scores

TOLS = (1e-3, 1e-5, 1e-7)
REF_PLAIN_ITER = 10_000  # the float64 reference runs plain up to here, then accelerated up to REF_ITER more
REF_ITER = 20_000
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    name: str
    n: int
    k: int
    lamb: float
    dtypes: tuple[torch.dtype, ...]
    dead: int = 0
    max_iter: int = 20_000


CASES = [
    Case("network", 100_000, 1000, 25.0, (torch.float32, torch.float64), max_iter=5000),
    Case("network, lamb 50", 20_000, 1000, 50.0, (torch.float32,)),
    Case("network, lamb 100", 20_000, 1000, 100.0, (torch.float32,)),
    Case("1% dead clusters", 50_000, 3000, 25.0, (torch.float32, torch.float64), max_iter=5000, dead=30),
    Case("N = K", 2000, 2000, 25.0, (torch.float32, torch.float64), max_iter=30_000),
]
QUICK = [
    Case("network", 4000, 200, 25.0, (torch.float32, torch.float64)),
    Case("network, lamb 100", 4000, 200, 100.0, (torch.float32,)),
    Case("1% dead clusters", 3000, 300, 25.0, (torch.float64,), dead=3),
    Case("N = K", 300, 300, 25.0, (torch.float64,)),
]
DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64"}


STALL = 4000  # a curve whose error has not halved in this many iterations has met its dtype's floor


class Stalled(Exception):
    pass


@contextlib.contextmanager
def timed_checks(points: list, start: list):
    """Append (iteration, marginal error, seconds since ``start[0]``) at every check of the solves
    inside; raise ``Stalled`` once the error has not halved in ``STALL`` iterations."""
    record = core.Loop.record

    def timed(self, *args):
        ended = record(self, *args)
        points.append((self.k, self.error, time.perf_counter() - start[0]))
        best = min(e for _, e, _ in points)
        halved = [k for k, e, _ in points if e <= 2 * best]
        if not ended and self.k - halved[0] > STALL:
            raise Stalled
        return ended

    core.Loop.record = timed
    try:
        yield
    finally:
        core.Loop.record = record


def agreement(labels: torch.Tensor, reference: torch.Tensor) -> float:
    return float((labels == reference).double().mean())


def curve_run(probs: torch.Tensor, case: Case, acceleration: str, reference: torch.Tensor) -> dict:
    points: list = []
    start = [time.perf_counter()]
    res = None
    with timed_checks(points, start), contextlib.suppress(Stalled):
        res = sl.sinkhorn_knopp(probs, kind="probs", lamb=case.lamb, acceleration=acceleration, tol=TOLS[-1],
                                max_iter=case.max_iter)
    total = time.perf_counter() - start[0]
    to_tol = {}
    for tol in TOLS:
        hit = next(((k, t) for k, e, t in points if e <= tol), None)
        to_tol[f"{tol:g}"] = None if hit is None else {"iterations": hit[0], "seconds": hit[1]}
    out = {"acceleration": acceleration, "seconds": total, "to_tol": to_tol, "stalled": res is None,
           "curve": [{"iterations": k, "error": e, "seconds": t} for k, e, t in points]}
    if res is not None:
        out.update(n_iter=res.n_iter, converged=res.converged, error=res.error, algorithm=res.algorithm,
                   agreement=agreement(res.labels, reference))
    return out


def sela_rule_run(probs: torch.Tensor, case: Case, acceleration: str, reference: torch.Tensor) -> dict:
    start = time.perf_counter()
    res = sl.sinkhorn_knopp(probs, kind="probs", lamb=case.lamb, acceleration=acceleration, criterion="sela",
                            max_iter=case.max_iter)
    seconds = time.perf_counter() - start
    return {"acceleration": acceleration, "n_iter": res.n_iter, "seconds": seconds, "error": res.error,
            "agreement": agreement(res.labels, reference)}


def import_sela(repo: str):
    """SeLa's ``sinkhornknopp`` module from a checkout of its repository."""
    if not os.path.isfile(os.path.join(repo, "sinkhornknopp.py")):
        raise SystemExit(f"--sela-repo {repo!r}: no sinkhornknopp.py there; clone github.com/yukimasano/self-label")
    try:
        import torchvision.utils  # noqa: F401
    except ImportError:  # util.py imports make_grid at module level; optimize_L_sk never calls it
        tv, tv_utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        tv_utils.make_grid = None
        tv.utils = tv_utils
        sys.modules.setdefault("torchvision", tv)
        sys.modules.setdefault("torchvision.utils", tv_utils)
    sys.path.insert(0, repo)
    try:
        import sinkhornknopp
    finally:
        sys.path.remove(repo)
    return sinkhornknopp


def sela_run(module, probs64: np.ndarray, case: Case, reference: torch.Tensor) -> dict:
    """SeLa's optimize_L_sk on its own float64 copy of the probabilities (it works in place)."""
    n, k = probs64.shape
    state = types.SimpleNamespace(PS=probs64.copy(), L=torch.zeros(1, n, dtype=torch.long), outs=[k],
                                  lamb=case.lamb, dtype=np.float64, dev="cpu")
    printed = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed), np.errstate(all="ignore"):
            module.optimize_L_sk(state, nh=0)
    except Exception as exc:  # e.g. an all-NaN matrix after P ** lamb underflows
        return {"failed": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    steps = re.search(r"step\s+(\d+)", printed.getvalue())  # it prints "error: ... step N"
    return {"seconds": seconds, "n_iter": int(steps.group(1)) if steps else None,
            "agreement": agreement(state.L[0], reference)}


def plot(case_rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"none": "tab:blue", "auto": "tab:orange"}
    styles = {"float32": "-", "float64": "--"}
    for row in case_rows:
        for run in row["curves"]:
            pts = [(c["seconds"], c["error"]) for c in run["curve"] if c["error"] > 0]
            if pts:
                label = f"{'plain' if run['acceleration'] == 'none' else 'accelerated'} {row['dtype']}"
                ax.plot(*zip(*pts, strict=True), styles[row["dtype"]], color=colours[run["acceleration"]],
                        label=label, marker=".", markersize=3)
    for tol in TOLS:
        ax.axhline(tol, color="0.8", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="wall time since the call (s)", ylabel="column marginal error (L1)",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def fmt_tol(run: dict, tol: float) -> str:
    hit = run["to_tol"][f"{tol:g}"]
    return "not reached" if hit is None else f"{hit['iterations']} it, {hit['seconds']:.2f} s"


def table(rows: list[dict]) -> str:
    out = ["| case | N x K | lamb | dtype | solver | to 1e-3 | to 1e-5 | to 1e-7 | SeLa's rule | labels vs f64 ref |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for row in rows:
        shape = f"{row['n']}x{row['k']}"
        for run, sela in zip(row["curves"], row["sela_rule"], strict=True):
            name = "plain" if run["acceleration"] == "none" else "accelerated"
            out.append(f"| {row['case']} | {shape} | {row['lamb']:g} | {row['dtype']} | {name} | "
                       f"{fmt_tol(run, 1e-3)} | {fmt_tol(run, 1e-5)} | {fmt_tol(run, 1e-7)} | "
                       f"{sela['n_iter']} it, {sela['seconds']:.2f} s | {100 * sela['agreement']:.3f}% |")
        if row.get("sela_repo") and (row["case"], shape) not in shown:
            shown.add((row["case"], shape))
            s = row["sela_repo"]
            result = s["failed"] if "failed" in s else f"{s['n_iter']} it, {s['seconds']:.2f} s"
            agree = "" if "failed" in s else f"{100 * s['agreement']:.3f}%"
            out.append(f"| {row['case']} | {shape} | {row['lamb']:g} | float64 | SeLa optimize_L_sk | | | | "
                       f"{result} | {agree} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    ratios, speedups = [], []
    for row in rows:
        plain, fast = row["curves"]
        p, f = plain["to_tol"]["1e-05"], fast["to_tol"]["1e-05"]
        if p is None and f is not None:
            p = {"iterations": plain["curve"][-1]["iterations"]}  # plain did not get there: a lower bound
        if p and f:
            ratios.append(f["iterations"] / p["iterations"])
        s = row.get("sela_repo")
        if s and "failed" not in s:
            speedups.append((row["case"], row["dtype"], s["seconds"] / row["sela_rule"][1]["seconds"]))
    lines = []
    if ratios:
        lines.append(f"Accelerated / plain iterations to 1e-5: median {np.median(ratios):.3f}, "
                     f"largest {max(ratios):.3f}, over {len(ratios)} runs.")
    for case, dtype, speed in speedups:
        lines.append(f"SeLa's optimize_L_sk (float64) / ours accelerated to SeLa's rule, {case} {dtype}: {speed:.1f}x.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sela-repo", help="a checkout of github.com/yukimasano/self-label (for optimize_L_sk)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--cases", nargs="+", help="names of the cases to run (default: all)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    sela = import_sela(args.sela_repo) if args.sela_repo else None
    cases = [c for c in (QUICK if args.quick else CASES) if not args.cases or c.name in args.cases]
    stamp = dt.datetime.now().strftime("%Y%m%d")
    rows: list[dict] = []
    for case in cases:
        probs64 = make_scores(case.n, case.k, kind="probs", dead=case.dead, dtype=torch.float64, seed=0)
        ref = sl.sinkhorn_knopp(probs64, kind="probs", lamb=case.lamb, acceleration="none", tol=1e-9,
                                max_iter=REF_PLAIN_ITER)
        ref_kind = "plain"
        if not ref.converged:  # plain needs too long (N = K): the accelerated solver, same fixed point
            ref = sl.sinkhorn_knopp(probs64, kind="probs", lamb=case.lamb, tol=1e-9, max_iter=REF_ITER, init=ref)
            ref_kind = "accelerated from the plain run"
        print(f"{case.name} {case.n}x{case.k} lamb {case.lamb:g}: float64 reference {ref_kind}, "
              f"converged {ref.converged}, error {ref.error:.2g}", flush=True)
        sela_row = sela_run(sela, probs64.numpy(), case, ref.labels) if sela is not None else None
        case_rows = []
        for dtype in case.dtypes:
            probs = probs64.to(dtype)
            row = {"case": case.name, "n": case.n, "k": case.k, "lamb": case.lamb, "dead": case.dead,
                   "dtype": DTYPE_NAME[dtype], "reference": ref_kind, "reference_converged": ref.converged,
                   "reference_error": ref.error,
                   "curves": [curve_run(probs, case, acc, ref.labels) for acc in ("none", "auto")],
                   "sela_rule": [sela_rule_run(probs, case, acc, ref.labels) for acc in ("none", "auto")]}
            if sela_row is not None:
                row["sela_repo"] = sela_row
            case_rows.append(row)
            print(table([row]).split("\n", 2)[2], flush=True)
            del probs
        rows += case_rows
        if not args.no_save:  # after every case, so a stopped run keeps what it measured
            slug = case.name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("=", "eq")
            plot(case_rows, f"{case.name}: {case.n} x {case.k}, lamb {case.lamb:g}",
                 os.path.join(args.out, f"convergence-{slug}-{stamp}.png"))
            save(args.out, stamp, rows)
        del probs64
    print()
    print(table(rows))
    print()
    print(summary(rows))


def save(out: str, stamp: str, rows: list[dict]) -> None:
    info = machine()
    save_json(os.path.join(out, f"convergence-{stamp}.json"),
              {"machine": info, "date": stamp, "tols": TOLS, "rows": rows,
               "command": "python benchmarks/bench_convergence.py " + " ".join(sys.argv[1:])})
    with atomic_write(os.path.join(out, f"convergence-{stamp}.md"), "w") as fh:
        fh.write(f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}.\n\n")
        fh.write(table(rows) + "\n\n" + summary(rows) + "\n")


if __name__ == "__main__":
    main()
