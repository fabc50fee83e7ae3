"""``selflabel bench`` runs and reports every solver as measured or skipped, with timings that
cannot show impossible values, error curves that run forward in time and plots whose series
can be told apart."""

import itertools
import json

import pytest
import torch

import selflabel.bench as bench
from selflabel.bench import run_bench, solvers
from selflabel.cli import main
from selflabel.synthetic import make_scores


def _forward(curve):
    return all(b["seconds"] >= a["seconds"] and b["iterations"] > a["iterations"] for a, b in itertools.pairwise(curve))


def _styles(report):
    """(colour, line style) of every series the time plot draws for ``report``."""
    keys = {(bench.FLOOR, d) for s in report["sizes"] for d in s["read_floor_ms_by_dtype"]}
    keys |= {(r["solver"], r["dtype"]) for s in report["sizes"] for r in s["results"] if "skipped" not in r}
    return {key: (st["color"], st["linestyle"]) for key in keys for st in [bench.series_style(*key)]}


def test_bench_report(tmp_path):
    out = tmp_path / "r" / "report.json"
    report = run_bench([(300, 10)], lamb=10.0, tol=1e-3, max_iter=64, out=str(out), progress=False,
                       min_span=0.005, budget=2.0)
    data = json.loads(out.read_text())
    size = data["sizes"][0]
    assert data["machine"]["threads"] >= 1 and size["read_floor_ms"] > 0
    assert set(size["read_floor_ms_by_dtype"]) == {"float32", "float64"}
    names = {(s.name, str(s.dtype).split(".")[-1]) for s in solvers("cpu")}
    rows = size["results"]
    assert {(r["solver"], r["dtype"]) for r in rows} == names
    table = (tmp_path / "r" / "report.md").read_text()
    for r in rows:
        if "skipped" in r:
            assert r["skipped"]
            continue
        # a number, positive, and below the floor only with the flag
        assert r["ms_per_iter"] > 0 and r["ms_per_iter_method"] in (bench.DIFFERENCE, bench.UPPER_BOUND)
        assert r["below_read_floor"] == (r["ms_per_iter"] < size["read_floor_ms_by_dtype"][r["dtype"]])
        line = next(x for x in table.splitlines() if f"| {r['solver']} | {r['dtype']} |" in x)
        assert (bench.BELOW_FLOOR in line) == r["below_read_floor"]
        # one run: cumulative time at checks 1, 2, 4, ..., never backwards
        curve = r["curve"]
        assert curve and _forward(curve) and curve[0]["iterations"] == 1
        assert all(c["iterations"] & (c["iterations"] - 1) == 0 or c["iterations"] == 64 for c in curve)
        assert all(c["error"] >= 0 for c in curve)
    measured = {r["solver"] for r in rows if "skipped" not in r}
    assert {"selflabel cpu scaling", "SeLa numpy loop", "POT ot.sinkhorn", "SwAV/DINOv2 in-place loop"} <= measured
    ours = next(r for r in rows if r["solver"] == "selflabel cpu scaling" and r["dtype"] == "float64")
    assert ours["to_tol"] is not None and ours["curve"][-1]["error"] <= 1e-3
    assert ours["to_tol"]["seconds"] == ours["curve"][-1]["seconds"]
    for f in report["files"]:
        assert (tmp_path / "r" / f.rsplit("/", 1)[-1]).exists()
    assert "| 300 x 10 | selflabel cpu scaling |" in table and "not resolved" not in table.lower()
    # every series of this report (several solvers, two dtypes, the floors) has its own colour and line style
    styles = _styles(data)
    assert len(styles) > 10 and len(set(styles.values())) == len(styles)


def test_curves_are_one_run_of_the_timed_solver():
    """The error at each check of the curve's single run is the error of a fresh run of that many
    iterations (the implementation timed per iteration), so the curve and the timing agree."""
    probs = make_scores(300, 10, kind="probs", temperature=4.0, seed=0)
    picked = {("selflabel cpu scaling", torch.float64), ("torch two-matvec loop (SeLa gpu_sk)", torch.float64),
              ("SwAV/DINOv2 in-place loop", torch.float32), ("SeLa numpy loop", torch.float64),
              ("POT ot.sinkhorn", torch.float64), ("POT ot.bregman.sinkhorn_log", torch.float64)}
    for s in solvers("cpu"):
        if (s.name, s.dtype) not in picked or s.skip:
            continue
        prepared = s.make(probs, 10.0)
        rec = bench.Recorder("cpu", tol=0.0, max_iter=16, budget=60.0)
        prepared.curve(rec)
        assert [c["iterations"] for c in rec.points] == [1, 2, 4, 8, 16], s.name
        assert _forward(rec.points), s.name
        for c in rec.points:
            assert c["error"] == pytest.approx(prepared.run(c["iterations"]), rel=1e-5, abs=1e-12), (s.name, c)


def test_recorder_refuses_a_curve_that_runs_backwards():
    rec = bench.Recorder("cpu", tol=0.0, max_iter=64, budget=60.0)
    rec.begin()
    assert not rec.check(1, 0.5, 0.010)
    assert not rec.check(2, 0.4, 0.010)  # equal times are fine
    with pytest.raises(AssertionError, match="backwards"):
        rec.check(4, 0.3, 0.005)
    with pytest.raises(AssertionError, match="backwards"):
        bench.assert_forward([{"iterations": 1, "seconds": 0.2}, {"iterations": 2, "seconds": 0.1}])
    # the budget ends the run once the next check (twice the iterations) would pass it
    rec = bench.Recorder("cpu", tol=0.0, max_iter=64, budget=1.0)
    rec.begin()
    assert not rec.check(1, 0.5, 0.3) and rec.check(2, 0.4, 0.6) and rec.out_of_budget


def _fake_clock(monkeypatch, seconds_of_run):
    """``bench._timed`` reports ``seconds_of_run(n)`` for a call that runs n iterations."""
    last = {}

    def run(n):
        last["n"] = n
        return 0.0

    def timed(fn, device):
        fn()
        return seconds_of_run(last["n"])
    monkeypatch.setattr(bench, "_timed", timed)
    return run


def test_per_iteration_is_never_negative_nor_unresolved(monkeypatch):
    # setup 10 ms, 1 ms per iteration: the difference is resolved and exact
    run = _fake_clock(monkeypatch, lambda n: 0.010 + 0.001 * n)
    got = bench.per_iteration(run, min_span=0.0)
    assert got["method"] == bench.DIFFERENCE and got["seconds"] == pytest.approx(0.001)
    # noise larger than the iteration: a long run timed faster than the short one. The difference
    # would be negative; the long run grows until it is resolved.
    run = _fake_clock(monkeypatch, lambda n: 0.010 - 0.002 * (n > 1) + 1e-4 * n)
    got = bench.per_iteration(run, min_span=0.0)
    assert got["method"] == bench.DIFFERENCE and [r["iterations"] for r in got["runs"]] == [1, 4, 16, 64, 256]
    assert got["seconds"] == pytest.approx((0.008 + 0.0256 - 0.0101) / 255)
    # iterations that cost nothing measurable: never resolved, so an upper bound, still positive
    run = _fake_clock(monkeypatch, lambda n: 0.010)
    got = bench.per_iteration(run, min_span=0.0, max_long=256)
    assert got["method"] == bench.UPPER_BOUND and got["seconds"] == pytest.approx(0.010 / 256)


def test_impossible_time_is_flagged(tmp_path, monkeypatch, capsys):
    """A solver that reports iterations faster than reading the matrix once gets the flag in the
    JSON and the marker in the table, and the plot does not draw it as a result."""
    def impossible(probs, lamb):
        def curve(rec):
            rec.begin()
            for k in (1, 2, 4):
                if rec.check(k, 1.0 / k, rec.elapsed()):
                    return
        return bench.Prepared(lambda n: 0.0, curve)  # n iterations in no time at all

    every = bench.solvers
    monkeypatch.setattr(bench, "solvers", lambda device: [
        *(s for s in every(device) if s.name == "SeLa numpy loop"),
        bench.Solver("too fast", torch.float32, impossible)])
    out = tmp_path / "r.json"
    run_bench([(2000, 50)], lamb=10.0, tol=1e-3, max_iter=4, out=str(out), progress=False, min_span=0.005,
              budget=2.0)
    rows = {r["solver"]: r for r in json.loads(out.read_text())["sizes"][0]["results"]}
    fake = rows["too fast"]
    assert fake["below_read_floor"] is True and fake["ms_per_iter"] > 0
    # an iteration of no work is usually below the timer's resolution (the upper-bound method), but a
    # scheduler hiccup can make the long run resolvably longer: the table marks whichever method ran
    bound = " (upper bound)" if fake["ms_per_iter_method"] == bench.UPPER_BOUND else ""
    assert f"| too fast | float32 | {bench._ms(fake['ms_per_iter'])}{bound} ({bench.BELOW_FLOOR}) |" in \
        (tmp_path / "r.md").read_text()
    assert rows["SeLa numpy loop"]["below_read_floor"] is False  # 2000 x 50: real iterations are not that fast


def _report(sizes, flagged=("SeLa numpy loop", "float64")):
    """A report of every CPU solver at ``sizes``; ``flagged`` is below the floor at the first size."""
    out = []
    for i, (n, k) in enumerate(sizes):
        results = []
        for s in solvers("cpu"):
            dtype = str(s.dtype).split(".")[-1]
            if s.skip:
                results.append({"solver": s.name, "dtype": dtype, "skipped": s.skip})
                continue
            below = i == 0 and (s.name, dtype) == flagged
            results.append({"solver": s.name, "dtype": dtype, "ms_per_iter": 1.0 + i,
                            "ms_per_iter_method": bench.DIFFERENCE, "below_read_floor": below,
                            "curve_time": "one run", "to_tol": None, "curve_truncated_by_time_budget": False,
                            "curve": [{"iterations": 2**j, "seconds": 0.01 * 2**j, "error": 0.5**j} for j in range(5)]})
        out.append({"n": n, "k": k, "read_floor_ms": 0.5, "read_floor_ms_by_dtype": {"float32": 0.5, "float64": 1.0},
                    "results": results})
    return {"tol": 1e-4, "machine": {"cpu": "test cpu"}, "sizes": out}


def test_plot_series_are_told_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    axes = []
    save = bench._save
    monkeypatch.setattr(bench, "_save", lambda plt, fig, ax, path: (axes.append(ax), save(plt, fig, ax, path))[1])
    report = _report([(2000, 50), (4000, 100)])
    bench.plots(report, str(tmp_path / "p"))
    time_ax, error_ax = axes
    lines = [ln for ln in time_ax.get_lines() if not ln.get_label().startswith("_")]
    series = [ln for ln in lines if bench.BELOW_FLOOR not in ln.get_label()]
    styles = [(ln.get_color(), ln.get_linestyle()) for ln in series]
    assert len(series) == len(_styles(report)) and len(set(styles)) == len(styles)
    # the flagged timing is drawn apart (an x, no line), not as a point of its series
    sela = next(ln for ln in series if ln.get_label() == "SeLa numpy loop [float64]")
    assert list(sela.get_xdata()) == [400_000] and list(sela.get_ydata()) == [2.0]
    flagged = [ln for ln in lines if bench.BELOW_FLOOR in ln.get_label()]
    assert len(flagged) == 1 and flagged[0].get_marker() == "x" and flagged[0].get_linestyle() == "None"
    assert list(flagged[0].get_xdata()) == [100_000] and flagged[0].get_color() == sela.get_color()
    # both N and K vary: the x axis is the matrix size, each size named
    assert time_ax.get_xlabel().startswith("N x K entries")
    assert [t.get_text() for t in time_ax.get_xticklabels()] == ["2000 x 50", "4000 x 100"]
    for ln in error_ax.get_lines():
        x = list(ln.get_xdata())
        assert x == sorted(x)


def test_series_styles():
    """Every solver its own colour and marker (the CPU and Triton backend of one algorithm, never
    in one report, share a colour), dtypes told apart by line style."""
    names = list(bench.SOLVER_STYLE)
    assert {s.name for s in solvers("cpu")} | {s.name for s in solvers("cuda")} <= set(names)
    triples = {(st["color"], st["marker"], st["linestyle"])
               for n in names for d in ("float32", "float64") for st in [bench.series_style(n, d)]}
    assert len(triples) == 2 * len(names)
    for device_names in ([n for n in names if "triton" not in n], [n for n in names if "cpu" not in n]):
        colours = [bench.series_style(n, "float32")["color"] for n in device_names]
        assert len(set(colours)) == len(colours)
    assert bench.series_style(names[0], "float32")["linestyle"] == "-"
    assert bench.series_style(names[0], "float64")["linestyle"] == "--"
    floors = {bench.series_style(bench.FLOOR, d)["linestyle"] for d in ("float32", "float64")}
    assert len(floors) == 2


def test_size_axis_is_named_by_what_varies():
    label, xs, ticks = bench.size_axis([(2000, 50), (8000, 50)])
    assert label.startswith("N (rows)") and xs == [2000, 8000] and ticks is None
    label, xs, ticks = bench.size_axis([(2000, 50), (2000, 200)])
    assert label.startswith("K (columns)") and xs == [50, 200]
    label, xs, ticks = bench.size_axis([(2000, 50), (4000, 100)])
    assert label.startswith("N x K entries") and xs == [100_000, 400_000] and ticks == ["2000 x 50", "4000 x 100"]


def test_bench_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["bench", "--sizes", "100by10", "--out", str(tmp_path / "x.json")]) == 2
    assert "NxK" in capsys.readouterr().err
