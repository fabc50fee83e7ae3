"""File modes: every file selflabel writes is an ordinary new file, 0o666 & ~umask."""

import os
import stat

import numpy as np
import pytest

import selflabel.train.loop as loop
from selflabel.cli import main
from selflabel.io import atomic_write, current_umask, temp_file
from selflabel.store import ScoreStore
from selflabel.train import train


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True)
def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # unchanged by the read


@pytest.mark.parametrize("umask,want", [(0o022, 0o644), (0o077, 0o600)], indirect=["umask"])
def test_written_files_follow_umask(tmp_path, umask, want, monkeypatch):
    scores = tmp_path / "scores.npy"
    np.save(scores, np.random.default_rng(0).random((60, 4)))
    for name in ("labels.npy", "labels.txt"):
        assert main(["label", str(scores), "--out", str(tmp_path / name), "--quiet"]) in (0, 3)
        assert _mode(tmp_path / name) == want, name
    with ScoreStore(tmp_path / "store.npy", n=3, k=2) as store:
        store.append(np.zeros((3, 2)))
    assert _mode(tmp_path / "store.npy") == want
    with atomic_write(tmp_path / "replaced.bin") as fh:
        fh.write(b"x")
    assert _mode(tmp_path / "replaced.bin") == want
    fd, tmp = temp_file(tmp_path / "t")
    os.close(fd)
    assert _mode(tmp) == want and os.path.basename(tmp).startswith(".t.")

    # checkpoint.pt and metrics.json of a one-epoch run (the evaluation itself is not under test)
    scores_ = {"nmi": 0.0, "ari": 0.0, "acc": 0.0, "m2o_acc": 0.0, "clusters": 10}
    stub = {"labels": scores_, "kmeans_features": {**scores_, "library": "-"},
            "features": {"knn_acc": 0.0, "linear_acc": 0.0}}
    monkeypatch.setattr(loop, "_evaluate", lambda *a: stub)
    run = tmp_path / "run"
    train(out=str(run), epochs=1, nopts=1, batch_size=256, arch="mlp", progress=False, tensorboard=False)
    for name in ("checkpoint.pt", "metrics.json"):
        assert _mode(run / name) == want, name
