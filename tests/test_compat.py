"""Drop-ins against plain-torch float64 re-implementations of the peers' documented loops."""

import numpy as np
import pytest
import torch

from selflabel.compat import FAST_SPREAD, _direct_small
from selflabel.compat.dinov2 import sinkhorn_knopp_teacher
from selflabel.compat.sela import optimize_labels
from selflabel.compat.swav import distributed_sinkhorn
from selflabel.distributed import Reducer
from selflabel.synthetic import make_scores


def swav_reference(out, epsilon, iters):
    """SwAV's distributed_sinkhorn on one process, as published (float64 here)."""
    q = torch.exp(out.double() / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def sela_reference(ps, lamb):
    """SeLa's optimize_L_sk loop (numpy float64): returns labels and iterations."""
    ps = np.ascontiguousarray(ps.T, dtype=np.float64) ** lamb
    k, n = ps.shape
    r, c = np.ones((k, 1)) / k, np.ones((n, 1)) / n
    err, counter = 1e6, 0
    while err > 0.1:
        r = (1.0 / k) / (ps @ c)
        c_new = (1.0 / n) / (r.T @ ps).T
        if counter % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        counter += 1
    return np.argmax(ps * r, axis=0), counter


@pytest.mark.parametrize("b,k", [(64, 30), (256, 100), (20, 50)])
@pytest.mark.parametrize("iters", [1, 3, 5])
def test_swav_matches_reference(b, k, iters):
    out = torch.nn.functional.normalize(torch.randn(b, 16), dim=1) @ torch.nn.functional.normalize(
        torch.randn(k, 16), dim=1).T
    got = distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=iters)
    ref = swav_reference(out, 0.05, iters)
    assert got.shape == (b, k) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)
    assert torch.allclose(got.sum(1), torch.ones(b), atol=1e-5)


def test_swav_stable_where_the_peer_overflows():
    out = torch.randn(128, 40) * 3  # logits, not cosines: exp(out / 0.01) overflows float64
    assert not torch.isfinite(swav_reference(out, 0.01, 3)).all()
    got = distributed_sinkhorn(out, epsilon=0.01)
    assert torch.isfinite(got).all() and torch.allclose(got.sum(1), torch.ones(128), atol=1e-5)
    # equals the peer's loop done exactly (log domain, float64)
    logq = out.double() / 0.01
    logq = logq - torch.logsumexp(logq.flatten(), 0)
    for _ in range(3):
        logq = logq - torch.logsumexp(logq, 0, keepdim=True) - np.log(40)
        logq = logq - torch.logsumexp(logq, 1, keepdim=True) - np.log(128)
    assert torch.allclose(got.double(), torch.exp(logq) * 128, atol=1e-5)


def test_dinov2_matches_reference():
    teacher = torch.randn(96, 65, dtype=torch.float16) * 2
    got = sinkhorn_knopp_teacher(teacher, teacher_temp=0.07, n_iterations=3)
    ref = swav_reference(teacher.float(), 0.07, 3)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k,lamb", [(2000, 20, 25.0), (500, 50, 10.0)])
def test_sela_matches_reference(n, k, lamb):
    ps = make_scores(n, k, kind="probs", temperature=3.0, dtype=torch.float64, seed=4).numpy()
    ref_labels, _ = sela_reference(ps, lamb)
    assert np.array_equal(optimize_labels(ps, lamb=lamb), ref_labels)
    f32 = optimize_labels(ps.astype(np.float32), lamb=lamb, dtype=np.float32)
    assert (f32 == ref_labels).mean() >= 0.99


def test_sela_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        optimize_labels(np.full((4, 2), 0.5), dtype=np.int64)


def _cosines(b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, 32, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 32, generator=g), dim=1)
    return z @ c.T


@pytest.mark.parametrize("b,k", [(256, 3000), (1024, 300), (7, 50)])
def test_swav_fast_path_equals_the_published_loop(b, k):
    """Cosine scores at epsilon 0.05 take the direct fused path; its output is the peer's."""
    out = _cosines(b, k)
    got = distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3)
    assert torch.allclose(got.double(), swav_reference(out, 0.05, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_swav_returns_the_input_dtype(dtype):
    out = _cosines(64, 30).to(dtype)
    got = distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3)
    assert got.dtype == dtype
    assert torch.allclose(got.double(), swav_reference(out.double(), 0.05, 3), atol=torch.finfo(dtype).eps * 4)


def test_swav_reads_epsilon_and_iterations_from_args():
    import argparse
    import warnings

    out = _cosines(64, 30)
    opts = argparse.Namespace(epsilon=0.03, sinkhorn_iterations=5)
    ref = swav_reference(out, 0.03, 5)
    assert torch.allclose(distributed_sinkhorn(out, args=opts).double(), ref, atol=1e-6)
    # as in SwAV's main_swav.py: a module-global `args` of the caller
    code = "def call(out):\n    return distributed_sinkhorn(out)\n"
    module = {"distributed_sinkhorn": distributed_sinkhorn, "args": opts}
    exec(code, module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(module["call"](out).double(), ref, atol=1e-6)
    with pytest.warns(UserWarning, match="no epsilon given"):
        got = distributed_sinkhorn(out)
    assert torch.allclose(got.double(), swav_reference(out, 0.05, 3), atol=1e-6)


@pytest.mark.parametrize("b,k,iters", [(256, 3000, 3), (33, 70, 1), (7, 50, 5)])
def test_small_batch_torch_path_equals_the_published_loop(b, k, iters):
    """The plain-torch iterates a GPU runs for small batches (called here on CPU tensors) are the peer's,
    in float32 and float64, and leave the scores unchanged."""
    for dtype in (torch.float32, torch.float64):
        out = _cosines(b, k).to(dtype)
        before = out.clone()
        got = _direct_small(out, 20.0, iters, Reducer())
        assert got.dtype == dtype and torch.equal(out, before)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(got.double(), swav_reference(out, 0.05, iters), atol=tol, rtol=0)


def test_small_batch_torch_path_declines_a_wide_spread():
    out = torch.randn(64, 40)
    spread = float(out.amax(1).max() - out.min())
    assert _direct_small(out, 1.01 * FAST_SPREAD / spread, 3, Reducer()) is None
    assert _direct_small(out, 0.99 * FAST_SPREAD / spread, 3, Reducer()) is not None


@pytest.mark.parametrize("b", [256, 4096])
def test_swav_on_the_default_device_equals_the_published_loop(b):
    """On a GPU this is the small-batch torch path (B x K up to SMALL_GPU_ENTRIES), on CPU the fused one."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = _cosines(b, 3000).to(dev)
    got = distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3)
    assert got.device == out.device and got.dtype == torch.float32
    assert torch.allclose(got.double().cpu(), swav_reference(out.cpu(), 0.05, 3), atol=1e-6, rtol=0)


def test_small_batch_torch_path_leaves_nan_and_inf_to_the_checked_path():
    for bad in (float("nan"), float("inf"), float("-inf")):
        out = _cosines(16, 30)
        out[3, 4] = bad
        assert _direct_small(out, 20.0, 3, Reducer()) is None
