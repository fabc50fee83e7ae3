"""The fused C++ kernels against the plain-torch backend, pass by pass."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from selflabel import _C, _C_test
from selflabel.backends import ScoreBlock
from selflabel.backends.cpu import CpuBackend
from selflabel.backends.torch_ref import TorchBackend

SHAPES = [(1, 1, 1), (1, 7, 1), (1, 1, 9), (2, 37, 13), (1, 130, 515), (3, 65, 1031), (1, 5, 2050)]


def _close(x, y, dtype, rtol32=2e-5):
    rtol = rtol32 if dtype == torch.float32 else 1e-11
    return torch.allclose(x.double(), y.double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("exponentiate", [False, True])
def test_prepare(shape, dtype, kind, exponentiate):
    s = torch.randn(shape, dtype=torch.float64) * 3
    if kind == "probs":
        s = torch.softmax(s, -1)
    s = s.to(dtype)
    got = CpuBackend().prepare(s, 7.5, kind == "probs", exponentiate)
    ref = TorchBackend().prepare(s, 7.5, kind == "probs", exponentiate)
    for name in ("rowmax", "rowsum", "rowmin"):
        assert _close(getattr(got, name), getattr(ref, name), dtype), name
    assert torch.allclose(got.colmax.double(), ref.colmax.double(), atol=1e-4 if dtype == torch.float32 else 1e-10)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.mat.double(), ref.mat.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("exponentiate", [False, True])
def test_prepare_absorbs_column_potentials(dtype, kind, exponentiate):
    """With col_pot g: kernel lamb*(x - m) + g_j + f_i with f_i making every row's maximum 0."""
    s = torch.randn(2, 300, 17, dtype=torch.float64) * 3
    s = torch.softmax(s, -1) if kind == "probs" else s
    s = s.to(dtype)
    g = torch.randn(2, 17, dtype=dtype) * 40
    got = CpuBackend().prepare(s, 7.5, kind == "probs", exponentiate, col_pot=g)
    ref = TorchBackend().prepare(s, 7.5, kind == "probs", exponentiate, col_pot=g)
    plain = TorchBackend().prepare(s, 7.5, kind == "probs", False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-11)
    assert torch.allclose(got.mat.double(), ref.mat.double(), **tol)
    assert torch.allclose(got.row_pot.double(), ref.row_pot.double(), **tol)
    log_k = got.mat.log() if exponentiate else got.mat
    assert torch.allclose(log_k.amax(-1).double(), torch.zeros(2, 300, dtype=torch.float64), atol=1e-6)
    expect = plain.mat + g[:, None, :] + got.row_pot[..., None]
    finite = torch.isfinite(log_k) if exponentiate else torch.ones_like(log_k, dtype=torch.bool)
    assert torch.allclose(log_k[finite].double(), expect[finite].double(), rtol=1e-5, atol=1e-3)
    assert torch.equal(got.colmax, CpuBackend().prepare(s, 7.5, kind == "probs", exponentiate).colmax)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_pass(shape, dtype):
    H, N, K = shape
    M = torch.rand(shape, dtype=dtype) + 0.01
    a = torch.rand(N, dtype=dtype) + 0.1
    v = torch.rand(H, K, dtype=dtype) + 0.1
    u0 = torch.rand(H, N, dtype=dtype) + 0.1
    u_c, u_t = u0.clone(), u0.clone()
    w_c, ch_c = CpuBackend().scaling_pass(M, a, u_c, v)
    w_t, ch_t = TorchBackend().scaling_pass(M, a, u_t, v)
    assert _close(u_c, u_t, dtype) and _close(w_c, w_t, dtype, rtol32=1e-5)
    assert torch.allclose(ch_c, ch_t, rtol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_pass(shape, dtype):
    H, N, K = shape
    L = -torch.rand(shape, dtype=dtype) * 20
    log_a = torch.log(torch.rand(N, dtype=dtype) + 0.1)
    g = torch.randn(H, K, dtype=dtype)
    f0 = torch.randn(H, N, dtype=dtype)
    f_c, f_t = f0.clone(), f0.clone()
    lw_c, ch_c = CpuBackend().log_pass(L, log_a, f_c, g)
    lw_t, ch_t = TorchBackend().log_pass(L, log_a, f_t, g)
    atol = 2e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(f_c, f_t, atol=atol, rtol=0)
    assert torch.allclose(lw_c, lw_t, atol=atol * 4, rtol=0)
    assert torch.allclose(ch_c, ch_t, rtol=1e-3 if dtype == torch.float32 else 1e-9)


def test_log_pass_underflowing_column_is_finite_lower_bound():
    # Column 1 is ~1000 nats below everything else: its mass underflows in both dtypes.
    for dtype in (torch.float32, torch.float64):
        L = torch.zeros(1, 50, 3, dtype=dtype)
        L[..., 1] = -1000.0
        f = torch.zeros(1, 50, dtype=dtype)
        log_a = torch.full((50,), -torch.log(torch.tensor(50.0)).item(), dtype=dtype)
        g = torch.zeros(1, 3, dtype=dtype)
        lw, _ = CpuBackend().log_pass(L, log_a, f, g)
        exact = TorchBackend().log_pass(L, log_a, f.clone(), g)[0]
        assert torch.isfinite(lw).all()
        assert lw[0, 1] <= exact[0, 1] + 1e-4
        assert lw[0, 1] >= exact[0, 1] - torch.log(torch.tensor(50.0)).item() - 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("linear", [False, True])
def test_labels(dtype, linear):
    mat = torch.rand(2, 333, 77, dtype=dtype)
    log_v = torch.randn(2, 77, dtype=dtype) * 0.1
    got = CpuBackend().labels(mat, log_v, linear)
    ref = TorchBackend().labels(mat, log_v, linear)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("offset", [0, 5, 1000003])
def test_labels_ties_go_round_the_clusters(linear, offset):
    """Row i (global index offset + i) takes the first maximum at or after column i mod K."""
    mat = torch.ones(2, 9, 6) if linear else torch.zeros(2, 9, 6)
    mat[1, :, 4] = 0.5 if linear else -1.0  # head 1: cluster 4 never ties for the max
    got = CpuBackend().labels(mat, torch.zeros(2, 6), linear, row_offset=offset)
    start = (offset + torch.arange(9)) % 6
    assert torch.equal(got[0], start)
    assert torch.equal(got[1], torch.where(start == 4, 5, start))
    assert torch.equal(got, TorchBackend().labels(mat, torch.zeros(2, 6), linear, offset))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_score_blocks_recompute_the_prepared_kernel(shape, dtype, kind):
    """Passes over a ScoreBlock (kernel rows recomputed from the scores and the row
    shift, as the chunked backend runs them) equal passes over the prepared matrix."""
    H, N, K = shape
    s = torch.randn(shape, dtype=torch.float64) * 3
    if kind == "probs":
        s = torch.softmax(s, -1)
    s, probs, be = s.to(dtype), kind == "probs", CpuBackend()
    a = torch.rand(N, dtype=dtype) + 0.1
    v, log_v = torch.rand(H, K, dtype=dtype) + 0.1, torch.randn(H, K, dtype=dtype)
    u0, f0 = torch.rand(H, N, dtype=dtype) + 0.1, torch.randn(H, N, dtype=dtype)
    tight = dict(rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    for expo in (True, False):
        p = be.prepare(s, 7.5, probs, expo)
        block = ScoreBlock(s, p.rowmax, 7.5, probs)
        if expo:
            u1, u2 = u0.clone(), u0.clone()
            outs = be.scaling_pass(p.mat, a, u1, v), be.scaling_pass(block, a, u2, v)
            assert torch.allclose(u1, u2, **tight)
        else:
            f1, f2 = f0.clone(), f0.clone()
            outs = be.log_pass(p.mat, a.log(), f1, log_v), be.log_pass(block, a.log(), f2, log_v)
            assert torch.allclose(f1, f2, **tight)
        for x, y in zip(*outs, strict=True):
            assert torch.allclose(x, y, **tight)
        assert torch.equal(be.labels(p.mat, log_v, expo), be.labels(block, log_v, expo))


def test_passes_do_not_depend_on_the_thread_count():
    """Rows are cut into chunks by N alone and column partials are reduced in chunk
    order, so one worker thread gives the same bits as all of them."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs at least two intra-op threads to compare against one")
    s = torch.randn(2, 5003, 301, dtype=torch.float32) * 3
    a = torch.rand(5003) + 0.1
    v, g = torch.rand(2, 301) + 0.1, torch.randn(2, 301)
    runs = []
    for be in (CpuBackend(threads=1), CpuBackend()):
        p, lp = be.prepare(s, 9.0, False, True), be.prepare(s, 9.0, False, False)
        u, f = torch.ones(2, 5003), torch.zeros(2, 5003)
        w, cw = be.scaling_pass(p.mat, a, u, v)
        lw, cf = be.log_pass(ScoreBlock(s, lp.rowmax, 9.0, False), a.log(), f, g)
        runs.append([p.colmax, w, cw, u, lw, cf, f, be.labels(p.mat, v.log(), True)])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def _passes(threads: int, s: torch.Tensor, a: torch.Tensor, v: torch.Tensor,
            log_v: torch.Tensor | None = None) -> list[torch.Tensor]:
    be = CpuBackend(threads=threads)
    log_v = v.log() if log_v is None else log_v
    p = be.prepare(s, 9.0, False, True)
    u = torch.ones(s.shape[0], s.shape[1])
    w, change = be.scaling_pass(p.mat, a, u, v)
    return [p.mat, p.colmax, w, change, u, be.labels(p.mat, log_v, True)]


def test_passes_from_several_threads_at_once():
    """The bindings release the GIL: passes started from several Python threads at once, with more
    intra-op threads than cores, give the one-thread bits."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4003, 263, generator=gen) * 3
    a, v = torch.rand(4003, generator=gen) + 0.1, torch.rand(2, 263, generator=gen) + 0.1
    ref = _passes(1, s, a, v)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        barrier = threading.Barrier(4)

        def concurrent(_):
            barrier.wait()
            return _passes(0, s, a, v)

        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(concurrent, range(4)))
    finally:
        torch.set_num_threads(before)
    for out in outs:
        for x, y in zip(out, ref, strict=True):
            assert torch.equal(x, y)


def test_a_pass_does_not_wait_for_helpers_that_never_start():
    """With every helper thread held busy (as a busy machine may leave them unscheduled), a pass on
    two or three threads runs every chunk on the calling thread and returns; a pass that waited for
    its helpers would never return (the test would time out). With the helpers free, they do run
    chunks."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    ex = ThreadPoolExecutor(1)
    try:
        for threads in (2, 3):
            for busy in (True, False):
                on_caller = ex.submit(_C_test.chunks_on_caller, 4003, 263, threads, busy).result(timeout=120)
                assert len(on_caller) == 63
                assert all(on_caller) if busy else not all(on_caller)
        with pytest.raises(RuntimeError, match="threads must be >= 2"):
            _C_test.chunks_on_caller(4003, 263, 1, True)
        with pytest.raises(RuntimeError, match="large enough"):
            _C_test.chunks_on_caller(100, 10, 2, True)
    finally:
        ex.shutdown(wait=False)
        torch.set_num_threads(before)


def test_passes_in_a_forked_child():
    """A process forked after the passes ran on helpers has none of the helper threads; its passes
    still run on two threads, with the same bits. (torch's own OpenMP ops hang in such a child, which
    is why DataLoader workers run on one thread; the child here runs only the passes and compares
    with numpy.)"""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4003, 263, generator=gen) * 3
    a, v = torch.rand(4003, generator=gen) + 0.1, torch.rand(2, 263, generator=gen) + 0.1
    log_v = v.log()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = _passes(2, s, a, v)  # the parent's helpers have run
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 when every output has the parent's bits
            out = _passes(2, s, a, v, log_v)
            same = all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(out, ref, strict=True))
            os._exit(0 if same else 1)
        deadline = time.monotonic() + 120
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the passes hung in the forked child")
    finally:
        torch.set_num_threads(before)
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the child's passes differ from the parent's"


@pytest.mark.parametrize("algorithm", ["scaling", "log"])
def test_solves_on_one_and_two_threads_give_the_same_bits(algorithm):
    """A whole solve gives the same bits on one thread and on two (helpers taking chunks as they
    are scheduled)."""
    import selflabel as sl

    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(20000, 40, generator=gen) * 2  # 12 grains of 65536 entries: two workers run
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = sl.sinkhorn_knopp(scores, backend="cpu", algorithm=algorithm, lamb=20, tol=1e-7)
            runs.append((res.n_iter, res.error, res.labels, res.log_u, res.log_v))
    finally:
        torch.set_num_threads(before)
    assert runs[0][:2] == runs[1][:2]
    for x, y in zip(runs[0][2:], runs[1][2:], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 2), (torch.float64, 4)])
def test_vectorised_exp_and_log_accuracy(dtype, ulps):
    """csrc/vec_math.h's exp and log, through the test-only extension selflabel._C_test (csrc/test_hooks.cpp)."""
    eps = torch.finfo(dtype).eps
    lo = -87.0 if dtype == torch.float32 else -708.0
    x = torch.linspace(lo, 88.0 if dtype == torch.float32 else 709.0, 200_001, dtype=dtype)
    ref = torch.exp(x.double())
    rel = ((_C_test.vec_exp(x).double() - ref) / ref).abs().max().item()
    assert rel <= ulps * eps
    assert _C_test.vec_exp(torch.tensor([-1e4, 1e4], dtype=dtype)).tolist() == [0.0, float("inf")]
    p = torch.logspace(-30, 30, 100_001, dtype=torch.float64).to(dtype)
    err = (_C_test.vec_log(p).double() - torch.log(p.double())).abs() / torch.log(p.double()).abs().clamp_min(1)
    assert err.max().item() <= ulps * eps
    special = _C_test.vec_log(torch.tensor([0.0, -1.0, float("inf"), torch.finfo(dtype).tiny / 4], dtype=dtype))
    assert special[0] == -float("inf") and torch.isnan(special[1]) and special[2] == float("inf")
    assert abs(special[3].item() - torch.log(torch.tensor(torch.finfo(dtype).tiny / 4, dtype=torch.float64))) < 1e-5


def test_kernels_reject_bad_tensors():
    M = torch.rand(1, 4, 3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _C.prepare(M.int(), 1.0, False, True)
    with pytest.raises(RuntimeError, match="shape"):
        _C.prepare(M[0], 1.0, False, True)
    with pytest.raises(RuntimeError, match="lamb"):
        _C.prepare(M, -1.0, False, True)
    with pytest.raises(RuntimeError, match="u must have shape"):
        _C.scaling_pass(M, torch.rand(4), torch.rand(1, 5), torch.rand(1, 3))
    with pytest.raises(RuntimeError, match="dtype"):
        _C.scaling_pass(M, torch.rand(4).double(), torch.rand(1, 4), torch.rand(1, 3))
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.log_pass(M, torch.rand(4), torch.rand(1, 4), torch.rand(1, 6)[:, ::2])
    with pytest.raises(RuntimeError, match="shift must have shape"):
        _C.scaling_pass(M, torch.rand(4), torch.rand(1, 4), torch.rand(1, 3), shift=torch.rand(1, 3), lamb=1.0)
    with pytest.raises(RuntimeError, match="lamb must be a positive finite number when shift"):
        _C.log_pass(M, torch.rand(4), torch.rand(1, 4), torch.rand(1, 3), shift=torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="threads must be >= 0"):
        _C.labels(M, torch.rand(1, 3), True, threads=-1)
    with pytest.raises(RuntimeError, match=r"omega \(the over-relaxation factor\) must be in \[1, 2\)"):
        _C.scaling_pass(M, torch.rand(4), torch.rand(1, 4), torch.rand(1, 3), omega=2.0)
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        _C.labels(M, torch.rand(1, 3), True, row_offset=-1)
    with pytest.raises(RuntimeError, match="col_pot must be finite"):
        _C.prepare(M, 1.0, False, True, col_pot=torch.tensor([[0.0, float("inf"), 0.0]]))
    with pytest.raises(RuntimeError, match="M must be contiguous"):
        _C.column_sums(M.transpose(1, 2).contiguous().transpose(1, 2), torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="v must have shape"):
        _C.normalised_rows(M, torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="x must be a CPU tensor"):
        _C_test.vec_exp(torch.rand(3, device="meta"))


def test_test_hooks_stay_out_of_the_package():
    """vec_exp and vec_log live in the test-only selflabel._C_test; no module of the package imports it."""
    assert not hasattr(_C, "vec_exp") and not hasattr(_C, "vec_log")
    package = Path(_C.__file__).parent
    assert not [p for p in package.rglob("*.py") if "_C_test" in p.read_text(encoding="utf-8")]
