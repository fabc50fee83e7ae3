"""``selflabel label`` and the atomic writer."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import selflabel as sl
from selflabel.cli import main
from selflabel.io import atomic_write
from selflabel.synthetic import make_scores


@pytest.fixture
def probs_file(tmp_path):
    p = make_scores(500, 10, kind="probs", temperature=4.0, seed=3).numpy()
    path = tmp_path / "scores.npy"
    np.save(path, p)
    return path, p


def test_label_writes_the_api_labels(probs_file, tmp_path, capsys):
    path, p = probs_file
    out = tmp_path / "labels.npy"
    assert main(["label", str(path), "--kind", "probs", "--lamb", "25", "--out", str(out), "--quiet"]) == 0
    labels = np.load(out)
    assert labels.dtype == np.int64
    assert np.array_equal(labels, sl.sinkhorn_knopp(p, kind="probs", lamb=25).labels.numpy())
    summary = capsys.readouterr().out
    assert "labelled 500 samples into 10 clusters" in summary and "converged" in summary
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_label_options(probs_file, tmp_path):
    path, p = probs_file
    out = tmp_path / "l.npy"
    rc = main(["label", str(path), "--kind", "probs", "--out", str(out), "--dtype", "float64", "--backend", "torch",
               "--algorithm", "log", "--tol", "1e-9", "--max-iter", "5000", "--quiet"])
    assert rc == 0
    ref = sl.sinkhorn_knopp(p, kind="probs", dtype=torch.float64, algorithm="log", tol=1e-9, max_iter=5000)
    assert np.array_equal(np.load(out), ref.labels.numpy())
    # --acceleration reaches the API: plain iterations, as sinkhorn_knopp(acceleration="none") gives them
    plain = tmp_path / "plain.npy"
    assert main(["label", str(path), "--kind", "probs", "--out", str(plain), "--acceleration", "none", "--quiet"]) == 0
    assert np.array_equal(np.load(plain), sl.sinkhorn_knopp(p, kind="probs", acceleration="none").labels.numpy())


def test_label_not_converged_exit_code(probs_file, tmp_path):
    path, _ = probs_file
    assert main(["label", str(path), "--kind", "probs", "--out", str(tmp_path / "l.npy"), "--max-iter", "2",
                 "--quiet"]) == 3


def test_label_bad_input_leaves_no_file(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((10, 3), 0.5))  # rows sum to 1.5
    out = tmp_path / "labels.npy"
    assert main(["label", str(bad), "--kind", "probs", "--out", str(out), "--quiet"]) == 2
    assert "summing to 1" in capsys.readouterr().err
    assert not out.exists()
    assert main(["label", str(tmp_path / "missing.npy"), "--out", str(out), "--quiet"]) == 2


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_module_entry_point(probs_file, tmp_path):
    path, _ = probs_file
    out = tmp_path / "labels.npy"
    proc = subprocess.run([sys.executable, "-m", "selflabel", "label", str(path), "--kind", "probs", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "labelled 500 samples" in proc.stdout and out.exists()


def test_label_with_memory_budget_streams_the_file(probs_file, tmp_path, capsys):
    path, p = probs_file
    out = tmp_path / "labels.npy"
    assert main(["label", str(path), "--kind", "probs", "--memory-budget", "80MB", "--out", str(out), "--quiet"]) == 0
    assert "(chunked/" in capsys.readouterr().out
    assert np.array_equal(np.load(out), sl.sinkhorn_knopp(p, kind="probs").labels.numpy())


def test_label_from_features_and_prototypes(tmp_path, capsys):
    """--prototypes labels (N, D) features by the implicit mode: the same labels as the
    materialised X W^T + b, written as (H, N) for stacked heads."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(300, 8, generator=gen), torch.randn(3, 12, 8, generator=gen)
    b = torch.randn(3, 12, generator=gen)
    paths = {name: tmp_path / f"{name}.npy" for name in ("x", "w", "b")}
    for name, t in zip("xwb", (x, w, b), strict=True):
        np.save(paths[name], t.numpy())
    out = tmp_path / "labels.npy"
    rc = main(["label", str(paths["x"]), "--prototypes", str(paths["w"]), "--bias", str(paths["b"]), "--lamb", "5",
               "--memory-budget", "70MB", "--out", str(out), "--quiet"])
    assert rc == 0 and "(chunked/" in capsys.readouterr().out
    ref = sl.sinkhorn_knopp(torch.einsum("nd,hkd->hnk", x, w) + b[:, None, :], lamb=5)
    assert np.array_equal(np.load(out), ref.labels.numpy())
    assert main(["label", str(paths["x"]), "--prototypes", str(paths["w"]), "--kind", "probs", "--out", str(out),
                 "--quiet"]) == 2
    assert "--kind probs" in capsys.readouterr().err
    assert main(["label", str(paths["x"]), "--bias", str(paths["b"]), "--out", str(out), "--quiet"]) == 2
    assert "--bias goes with --prototypes" in capsys.readouterr().err
    assert main(["label", str(paths["x"]), "--prototypes", str(tmp_path / "none.npy"), "--out", str(out),
                 "--quiet"]) == 2
    assert "none.npy" in capsys.readouterr().err
    assert main(["label", str(paths["x"]), "--prototypes", str(paths["w"]), "--device", "meta", "--out", str(out),
                 "--quiet"]) == 2
    assert "only 'cpu' and 'cuda' are supported" in capsys.readouterr().err


def _solve_must_not_run(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the solver ran before the output was checked")

    monkeypatch.setattr("selflabel.cli.sinkhorn_knopp", boom)
    monkeypatch.setattr("selflabel.solver.sinkhorn_knopp_features", boom)


def test_label_refuses_to_overwrite_an_input(probs_file, tmp_path, capsys, monkeypatch):
    """--out naming an input (the same path, a symlink or a hard link to it) is refused, the input intact."""
    path, _ = probs_file
    before = path.read_bytes()
    (tmp_path / "link.npy").symlink_to(path)
    os.link(path, tmp_path / "hard.npy")
    _solve_must_not_run(monkeypatch)
    for out in (path, tmp_path / "link.npy", tmp_path / "hard.npy", tmp_path / "sub" / ".." / "scores.npy"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(["label", str(path), "--kind", "probs", "--out", str(out), "--quiet"]) == 2, out
        assert "is the scores input" in capsys.readouterr().err
    w, b = tmp_path / "w.npy", tmp_path / "b.npy"
    np.save(w, np.ones((10, 4)))
    np.save(b, np.ones(10))
    for flag, out in (("--prototypes", w), ("--bias", b)):
        assert main(["label", str(path), "--prototypes", str(w), "--bias", str(b), "--out", str(out), "--quiet"]) == 2
        assert f"is the {flag} input" in capsys.readouterr().err
    assert path.read_bytes() == before and np.load(w).dtype == np.float64 and np.load(b).dtype == np.float64


def test_label_folders_are_clear_errors_before_solving(probs_file, tmp_path, capsys, monkeypatch):
    path, _ = probs_file
    _solve_must_not_run(monkeypatch)
    assert main(["label", str(tmp_path), "--out", str(tmp_path / "l.npy"), "--quiet"]) == 2
    assert "is a directory; pass a .npy file" in capsys.readouterr().err
    assert main(["label", str(path), "--prototypes", str(tmp_path), "--out", str(tmp_path / "l.npy"), "--quiet"]) == 2
    assert "--prototypes" in capsys.readouterr().err
    assert main(["label", str(path), "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a directory; name the labels file" in err
    assert main(["label", str(path), "--out", str(tmp_path / "missing" / "l.npy"), "--quiet"]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert main(["label", str(path), "--out", str(tmp_path / "labels.dat"), "--quiet"]) == 2
    assert "unknown format .dat" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["scores.npy"]


@pytest.mark.parametrize("suffix,delimiter", [(".txt", None), (".csv", ","), (".CSV", ",")])
def test_label_text_outputs(tmp_path, suffix, delimiter):
    """.txt / .csv get text: one line per sample, one integer column per head."""
    scores = make_scores(200, 6, kind="logits", seed=4, heads=2).numpy()
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    ref = sl.sinkhorn_knopp(scores, lamb=25).labels.numpy()  # (2, 200)
    out = tmp_path / f"labels{suffix}"
    assert main(["label", str(path), "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert len(text.splitlines()) == 200 and "." not in text
    assert np.array_equal(np.loadtxt(out, dtype=np.int64, delimiter=delimiter).T, ref)
    np.save(path, scores[0])
    assert main(["label", str(path), "--out", str(out), "--quiet"]) == 0
    assert np.array_equal(np.loadtxt(out, dtype=np.int64, delimiter=delimiter), ref[0])


def test_label_pt_output(probs_file, tmp_path):
    """.pt gets the labels as torch.load gives them back: the int64 tensor the API returns."""
    path, p = probs_file
    out = tmp_path / "labels.pt"
    assert main(["label", str(path), "--kind", "probs", "--out", str(out), "--quiet"]) == 0
    labels = torch.load(out, weights_only=True)
    assert labels.dtype == torch.int64 and torch.equal(labels, sl.sinkhorn_knopp(p, kind="probs").labels)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"selflabel {sl.__version__} (torch ")


def _options(parser):
    """(subcommand, option) pairs of every option the parser and its subcommands take."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {flag}", a) for flag, a in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action


def test_every_option_has_help():
    from selflabel.cli import build_parser

    options = list(_options(build_parser()))
    assert {"label --kind", "label --lamb", "label --tol", "demo --n", "demo --k", "train --method"} <= {
        name for name, _ in options}
    missing = [name for name, action in options if not action.help and not name.startswith("bench ")]
    assert missing == [], f"options without help: {missing}"


def _without(modules: list[str], argv: list[str], cwd) -> subprocess.CompletedProcess:
    """``selflabel ARGV`` in a fresh interpreter where ``modules`` cannot be imported."""
    code = (f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None\n"
            "from selflabel.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_without_the_train_extra_names_it(tmp_path):
    proc = _without(["scipy", "sklearn"], ["train", "--data", "digits", "--out", str(tmp_path / "run"), "--quiet"],
                    tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'selflabel[train]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_data_sources_name_their_extra(tmp_path, monkeypatch):
    from selflabel.train.data import load_image_set

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"--data digits .*pip install 'selflabel\[train\]'"):
        load_image_set("digits")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"--data cifar10:.*pip install 'selflabel\[vision\]'"):
        load_image_set(f"cifar10:{tmp_path}")


def test_train_without_tensorboard_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'selflabel[train]'" in err and "--no-tensorboard" in err
    assert not (tmp_path / "run").exists()


def test_bench_without_matplotlib_writes_the_report(tmp_path, monkeypatch, capsys):
    """No matplotlib: the JSON and the markdown table are written, exit 0, and the plots name the extra."""
    import selflabel.bench as bench

    every = bench.solvers
    monkeypatch.setattr(bench, "solvers", lambda device: [s for s in every(device) if s.name == "SeLa numpy loop"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--sizes", "300x10", "--tol", "1e-3", "--out", str(out)]) == 0
    assert "no plots" in (text := capsys.readouterr().out) and "pip install 'selflabel[bench]'" in text
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]
    assert "| 300 x 10 | SeLa numpy loop |" in (tmp_path / "r.md").read_text()
