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
