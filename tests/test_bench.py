"""``selflabel bench`` runs and reports every solver as measured or skipped."""

import json

from selflabel.bench import run_bench, solvers
from selflabel.cli import main


def test_bench_report(tmp_path):
    out = tmp_path / "r" / "report.json"
    report = run_bench([(300, 10)], lamb=10.0, tol=1e-3, max_iter=64, out=str(out), progress=False)
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] >= 1 and data["sizes"][0]["read_floor_ms"] > 0
    names = {(s.name, str(s.dtype).split(".")[-1]) for s in solvers("cpu")}
    rows = data["sizes"][0]["results"]
    assert {(r["solver"], r["dtype"]) for r in rows} == names
    for r in rows:
        if "skipped" in r:
            assert r["skipped"]
        else:
            assert (r["ms_per_iter"] is None or r["ms_per_iter"] > 0) and r["curve"]
            assert all(c["error"] >= 0 for c in r["curve"])
    measured = {r["solver"] for r in rows if "skipped" not in r}
    assert {"selflabel cpu scaling", "SeLa numpy loop", "POT ot.sinkhorn", "SwAV/DINOv2 in-place loop"} <= measured
    ours = next(r for r in rows if r["solver"] == "selflabel cpu scaling" and r["dtype"] == "float64")
    assert ours["to_tol"] is not None and ours["curve"][-1]["error"] <= 1e-3
    for f in report["files"]:
        assert (tmp_path / "r" / f.rsplit("/", 1)[-1]).exists()
    assert "| 300 x 10 | selflabel cpu scaling |" in (tmp_path / "r" / "report.md").read_text()


def test_bench_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["bench", "--sizes", "100by10", "--out", str(tmp_path / "x.json")]) == 2
    assert "NxK" in capsys.readouterr().err
