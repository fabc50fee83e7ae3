"""Implicit mode: features x prototypes, never storing N x K."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import selflabel as sl


def _data(n, k, d, heads=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    shape = (k, d) if heads is None else (heads, k, d)
    w = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1) * 4
    b = torch.randn(*shape[:-1], generator=g, dtype=dtype) * 0.3
    return x, w, b


@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_equal_materialised(heads, with_bias, dtype):
    x, w, b = _data(517, 23, 13, heads, dtype=dtype)
    bias = b if with_bias else None
    scores = torch.matmul(x, w.transpose(-1, -2)) + (b[..., None, :] if with_bias else 0)
    ref = sl.sinkhorn_knopp(scores, lamb=10.0, tol=1e-6, max_iter=5000)
    got = sl.sinkhorn_knopp_features(x, w, bias, lamb=10.0, tol=1e-6, max_iter=5000, memory_budget="70MB")
    assert got.labels.shape == ((517,) if heads is None else (3, 517)) and got.backend == "chunked"
    if dtype == torch.float64:
        assert got.n_iter == ref.n_iter and torch.equal(got.labels, ref.labels)
        assert torch.allclose(got.log_v, ref.log_v, atol=1e-10)
    else:  # the matmul may round differently from the block matmul
        assert abs(got.n_iter - ref.n_iter) <= 10 and (got.labels == ref.labels).float().mean() >= 0.995


def test_features_from_npy_file(tmp_path):
    x, w, _ = _data(300, 11, 7)
    np.save(tmp_path / "x.npy", x.numpy())
    ref = sl.sinkhorn_knopp(x @ w.T, lamb=10.0, tol=1e-9)
    got = sl.sinkhorn_knopp_features(str(tmp_path / "x.npy"), w, lamb=10.0, tol=1e-9, memory_budget="70MB")
    assert torch.equal(got.labels, ref.labels)


def test_features_bad_input():
    x, w, b = _data(50, 5, 4)
    with pytest.raises(ValueError, match="D=4"):
        sl.sinkhorn_knopp_features(x, w[:, :3])
    with pytest.raises(ValueError, match="bias must have shape"):
        sl.sinkhorn_knopp_features(x, w, torch.zeros(6))
    with pytest.raises(ValueError, match=r"features must have shape \(N, D\)"):
        sl.sinkhorn_knopp_features(x[None].repeat(2, 1, 1), w)
    with pytest.raises(TypeError, match="prototypes must be floating point"):
        sl.sinkhorn_knopp_features(x, w.long())
    with pytest.raises(ValueError, match="kind cannot be changed"):
        sl.sinkhorn_knopp_features(x, w, kind="probs")


def test_features_peak_memory_bounded(tmp_path):
    """N x K = 200k x 2000 (1.6 GB in float32) solved from 200k x 32 features within 100 MiB."""
    code = textwrap.dedent("""
        import torch, selflabel as sl

        def peak_rss():  # this process's high-water RSS (ru_maxrss would carry the parent's over fork)
            with open('/proc/self/status') as fh:
                return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith('VmHWM'))

        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(200_000, 32, generator=g), dim=1)
        w = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=1) * 4
        base = peak_rss()
        res = sl.sinkhorn_knopp_features(x, w, lamb=10.0, tol=0, max_iter=2, memory_budget=100 * 2**20)
        peak = peak_rss()
        print(base, peak, int(res.labels.shape[0]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak, n = (int(v) for v in proc.stdout.split())
    assert n == 200_000
    assert peak - base <= 100 * 2**20 + 64 * 2**20, f"grew {(peak - base) / 2**20:.0f} MiB"


def test_budget_counts_the_feature_rows(tmp_path):
    from selflabel.backends.chunked import rows_for_budget
    from selflabel.features import FeatureBlocks

    x = np.zeros((20_000, 2048), dtype=np.float32)
    np.save(tmp_path / "wide.npy", x)
    src = FeatureBlocks(str(tmp_path / "wide.npy"), torch.randn(10, 2048))
    budget = 256 * 2**20
    rows = rows_for_budget(src, torch.float32, budget)
    assert rows * 2 * 2048 * 4 < budget  # the two feature buffers alone fit the budget
