"""Triton kernels against their torch references (CPU interpreter without a GPU,
real sizes on a GPU), and the solver on backend="triton" against the C++ backend."""

import pytest
import torch
from conftest import ON_GPU
from selflabel.kernels import implicit, logdomain, prepare, scaling
from selflabel.kernels import labels as labels_k

import selflabel as sl
from selflabel.synthetic import make_scores

# The interpreter evaluates masked-off lanes too (e.g. -inf - -inf); numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = "cuda" if ON_GPU else "cpu"
# small odd shapes for the interpreter (N, K not multiples of the 4 x 32 blocks, K=1..3, N<K);
# a GPU session adds real sizes
SHAPES = [(1, 1, 1), (1, 5, 2), (1, 3, 3), (2, 13, 7), (1, 9, 70), (1, 2, 37)]
if ON_GPU:
    SHAPES += [(1, 100_003, 1000), (2, 4097, 3001)]
DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("exponentiate", [False, True])
def test_prepare_kernel(shape, dtype, probs, exponentiate):
    s = torch.randn(shape, dtype=torch.float64, device=DEV) * 3
    if probs:
        s = torch.softmax(s, -1)
    s = s.to(dtype)
    got = prepare.prepare(s, 7.5, probs, exponentiate)
    ref = prepare.torch_reference(s, 7.5, probs, exponentiate)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape
        tol = _tol(dtype)
        if i == 3:  # row sums: K roundings in another order, each up to eps times the largest |score|
            tol["atol"] = shape[2] * torch.finfo(dtype).eps * float(s.abs().amax())
        assert torch.allclose(g.double(), r.double(), **tol)


def test_prepare_keeps_lamb_in_float64():
    """lamb reaches the float64 kernels unrounded (a Python float is a float32 kernel argument unless declared)."""
    s = torch.randn(1, 9, 70, dtype=torch.float64, device=DEV) * 3
    lamb = 1 / 0.03  # not a float32 number
    got = prepare.prepare(s, lamb, False, False)[0]
    ref = prepare.torch_reference(s, lamb, False, False)[0]
    assert torch.allclose(got, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("omega", [1.0, 1.7])
def test_scaling_kernel(shape, dtype, omega):
    H, N, K = shape
    M = torch.rand(shape, dtype=dtype, device=DEV) + 0.01
    a = torch.rand(N, dtype=dtype, device=DEV) + 0.1
    v = torch.rand(H, K, dtype=dtype, device=DEV) + 0.1
    u0 = torch.rand(H, N, dtype=dtype, device=DEV) + 0.1
    u_k, u_r = u0.clone(), u0.clone()
    w_k, ch_k = scaling.scaling_pass(M, a, u_k, v, omega)
    w_r, ch_r = scaling.torch_reference(M, a, u_r, v, omega)
    assert torch.allclose(u_k, u_r, **_tol(dtype)) and torch.allclose(w_k, w_r, **_tol(dtype))
    assert torch.allclose(ch_k, ch_r, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("omega", [1.0, 1.7])
def test_log_kernel(shape, dtype, omega):
    H, N, K = shape
    L = -torch.rand(shape, dtype=dtype, device=DEV) * 20
    log_a = torch.log(torch.rand(N, dtype=dtype, device=DEV) + 0.1)
    g = torch.randn(H, K, dtype=dtype, device=DEV)
    f0 = torch.randn(H, N, dtype=dtype, device=DEV)
    f_k, f_r = f0.clone(), f0.clone()
    lw_k, ch_k = logdomain.log_pass(L, log_a, f_k, g, omega)
    lw_r, ch_r = logdomain.torch_reference(L, log_a, f_r, g, omega)
    atol = 2e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(f_k, f_r, atol=atol, rtol=0) and torch.allclose(lw_k, lw_r, atol=4 * atol, rtol=0)
    assert torch.allclose(ch_k, ch_r, rtol=1e-3)


def test_log_kernel_underflowing_column():
    L = torch.zeros(1, 20, 3, device=DEV)
    L[..., 1] = -1000.0
    log_a = torch.full((20,), -torch.log(torch.tensor(20.0)).item(), device=DEV)
    f, g = torch.zeros(1, 20, device=DEV), torch.zeros(1, 3, device=DEV)
    lw, _ = logdomain.log_pass(L, log_a, f, g)
    exact = logdomain.torch_reference(L, log_a, f.clone(), g)[0]
    assert torch.isfinite(lw).all()
    assert exact[0, 1] - torch.log(torch.tensor(20.0)) - 1e-3 <= lw[0, 1] <= exact[0, 1] + 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("linear", [False, True])
def test_labels_kernel(shape, dtype, linear):
    H, N, K = shape
    mat = torch.rand(shape, dtype=dtype, device=DEV)
    log_v = torch.randn(H, K, dtype=dtype, device=DEV) * 0.1
    assert torch.equal(labels_k.labels(mat, log_v, linear), labels_k.torch_reference(mat, log_v, linear))


@pytest.mark.parametrize("offset", [0, 68])
def test_labels_kernel_ties_go_round_the_clusters(offset):
    """Row i takes the first maximum at or after column (offset + i) mod K, across column tiles."""
    mat = torch.zeros(1, 5, 70, device=DEV)
    mat[0, 2, [40, 65]] = 1.0  # row 2: two tied maxima
    mat[0, 3] = -1e-30  # row 3: every entry ties within rounding
    out = labels_k.labels(mat, torch.zeros(1, 70, device=DEV), False, offset)
    start = [(offset + i) % 70 for i in range(5)]
    row2 = 40 if start[2] <= 40 or start[2] > 65 else 65
    assert out.tolist() == [[start[0], start[1], row2, start[3], start[4]]]
    assert torch.equal(out, labels_k.torch_reference(mat, torch.zeros(1, 70, device=DEV), False, offset))


@pytest.mark.parametrize("algorithm", ["scaling", "log", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_solver_on_triton_matches_cpu(algorithm, dtype):
    n, k = (40, 5) if not ON_GPU else (20_000, 300)
    scores = make_scores(n, k, kind="probs", temperature=2.0, dead=1, dead_margin=0.5, dtype=dtype, seed=2)
    res = sl.sinkhorn_knopp(scores.to(DEV), kind="probs", lamb=10.0, backend="triton", algorithm=algorithm,
                            tol=1e-6, max_iter=3000)
    ref = sl.sinkhorn_knopp(scores, kind="probs", lamb=10.0, backend="cpu", algorithm=algorithm, tol=1e-6,
                            max_iter=3000)
    assert ref.n_iter < 200  # keeps the interpreter run short
    assert res.backend == "triton" and res.converged and res.algorithm == ref.algorithm
    assert (res.labels.cpu() == ref.labels).float().mean() >= 0.99
    assert (res.plan().cpu().double() - ref.plan().double()).abs().sum() <= 1e-4


def test_triton_results_are_deterministic():
    scores = make_scores(50, 6, seed=8).to(DEV)
    r1 = sl.sinkhorn_knopp(scores, backend="triton", tol=0, max_iter=15)
    r2 = sl.sinkhorn_knopp(scores, backend="triton", tol=0, max_iter=15)
    assert torch.equal(r1.labels, r2.labels) and torch.equal(r1.log_v, r2.log_v)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter error")
def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA scores"):
        sl.sinkhorn_knopp(torch.randn(10, 3), backend="triton")


# implicit mode: (N, K, D) ragged against the 16 x 16 x 16 interpreter tiles; a GPU adds real sizes
IMPLICIT_SHAPES = [(1, 1, 1), (37, 23, 19), (16, 48, 33), (5, 70, 8)]
if ON_GPU:
    IMPLICIT_SHAPES += [(100_003, 1000, 128), (4097, 3001, 64)]


@pytest.mark.parametrize("shape", IMPLICIT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("omega", [1.0, 1.7])
@pytest.mark.parametrize("precision", ["highest", "high", "medium"] if ON_GPU else ["highest"])
def test_implicit_log_kernel(shape, dtype, with_bias, omega, precision, monkeypatch):
    N, K, D = shape
    gen = torch.Generator(device=DEV).manual_seed(N + K + D)
    x = torch.randn(N, D, dtype=dtype, device=DEV, generator=gen) / D**0.5
    w = torch.randn(K, D, dtype=dtype, device=DEV, generator=gen)
    bias = torch.randn(K, dtype=dtype, device=DEV, generator=gen) if with_bias else None
    s = x.double() @ w.double().T + (0 if bias is None else bias.double())
    rowmax = s.amax(1).to(dtype)
    log_a = torch.log(torch.rand(N, dtype=dtype, device=DEV, generator=gen) + 0.1)
    g = torch.randn(K, dtype=dtype, device=DEV, generator=gen)
    f0 = torch.randn(N, dtype=dtype, device=DEV, generator=gen)
    f_k, f_r = f0.clone(), f0.clone()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    lw_k, ch_k = implicit.implicit_log_pass(x, w, bias, 5.0, rowmax, log_a, f_k, g, omega)
    lw_r, ch_r = implicit.torch_reference(x, w, bias, 5.0, rowmax, log_a, f_r, g, omega)
    if dtype == torch.float64:
        tol_f = torch.full_like(s[:, 0], 1e-10)
    else:
        # the product error of kernel and reference, bounded per row: a float32 dot of D terms is
        # off by at most D * 2^-24 * sum |x| |w| on each side; "high" (three TF32 products) drops a
        # 2^-20 term more, "medium" (one TF32 product, each operand cut to 10 mantissa bits) up to
        # 2^-9 relative. The row's log-sum-exp moves by at most lamb times its largest score error,
        # the relaxed update by omega times that; 1e-4 covers the float32 update itself
        eps = 2 * D * 2.0**-24 + {"highest": 0.0, "high": 2.0**-20, "medium": 2.0**-9}[precision]
        mag = x.abs().double() @ w.abs().double().T + (0 if bias is None else bias.abs().double())
        tol_f = 1e-4 + omega * 5.0 * eps * mag.amax(1)
    assert ((f_k.double() - f_r.double()).abs() <= tol_f).all()
    # a column's log weight sums exp(lamb * s + f) over rows: off by a row's score and f errors at most
    assert torch.allclose(lw_k.double(), lw_r.double(), atol=4 * float(tol_f.max()), rtol=0)
    # the change sums |expm1(f_old - f_new)| over N rows: each term moves with its row's error in f
    assert torch.allclose(ch_k.double(), ch_r.double(), rtol=1e-2 if dtype == torch.float32 else 1e-8,
                          atol=float(tol_f.max()) * (N + float(ch_r)))


def test_dot_precision_follows_torch(monkeypatch):
    for setting, want in [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")]:
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda s=setting: s)
        assert implicit.dot_precision(torch.float32) == want
    assert implicit.dot_precision(torch.bfloat16) == implicit.dot_precision(torch.float16) == "tf32"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_implicit_solver_matches_materialised(dtype, heads, with_bias):
    """sinkhorn_knopp_features on the triton path equals sinkhorn_knopp(X W^T + b) (labels and duals)."""
    N, K, D = (41, 13, 21) if not ON_GPU else (20_011, 300, 64)
    gen = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(N, D, dtype=dtype, device=DEV, generator=gen)
    wshape = (K, D) if heads is None else (heads, K, D)
    w = torch.randn(wshape, dtype=dtype, device=DEV, generator=gen) / D**0.5
    bias = torch.randn(wshape[:-1], dtype=dtype, device=DEV, generator=gen) * 0.1 if with_bias else None
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    res = sl.sinkhorn_knopp_features(x, w, bias, lamb=5.0, backend="triton", tol=tol, max_iter=500)
    s = x.double() @ w.double().transpose(-1, -2) + (0 if bias is None else bias.double()[..., None, :])
    ref = sl.sinkhorn_knopp(s, lamb=5.0, dtype=torch.float64, algorithm="log", backend="torch", tol=1e-9,
                            max_iter=500)
    assert res.backend == "triton-implicit" and res.algorithm == "log" and res.converged
    assert res.labels.shape == ref.labels.shape
    mismatches = int((res.labels != ref.labels).sum())  # a count: a CUDA mean of ones need not be exactly 1.0
    assert mismatches <= (0.005 * res.labels.numel() if dtype == torch.float32 else 0)
    dv = res.log_v.double() - ref.log_v
    dv = dv - dv.mean(-1, keepdim=True)  # potentials are defined up to a constant
    assert dv.abs().max() <= (5e-3 if dtype == torch.float32 else 1e-6)


def test_implicit_features_move_to_the_device(tmp_path):
    """A features file, array or tensor elsewhere with device= given is loaded onto that device for the
    fused kernel: the same labels and duals as the features passed there."""
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, 9, generator=gen), torch.randn(6, 9, generator=gen)
    np.save(tmp_path / "x.npy", x.numpy())
    ref = sl.sinkhorn_knopp_features(x.to(DEV), w.to(DEV), lamb=5.0, backend="triton", tol=1e-6)
    for given in (str(tmp_path / "x.npy"), x.numpy(), x):
        got = sl.sinkhorn_knopp_features(given, w, lamb=5.0, backend="triton", device=DEV, tol=1e-6)
        assert got.backend == "triton-implicit" and got.labels.device.type == torch.device(DEV).type
        assert torch.equal(got.labels, ref.labels) and torch.equal(got.log_v, ref.log_v)


def test_implicit_triton_rejects_bad_input():
    x = torch.randn(10, 4, device=DEV)
    with pytest.raises(ValueError, match="prototypes must have shape"):
        sl.sinkhorn_knopp_features(x, torch.randn(5, 3, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="log domain only"):
        sl.sinkhorn_knopp_features(x, torch.randn(5, 4, device=DEV), backend="triton", algorithm="scaling")
    with pytest.raises(ValueError, match="memory_budget"):
        sl.sinkhorn_knopp_features(x, torch.randn(5, 4, device=DEV), backend="triton", memory_budget="1GB")


# chunked mode on the GPU path: host row blocks through DeviceFeed into the Triton passes. On CPU
# the feed passes blocks through and the test swaps the C++ block passes for the Triton ones (the
# interpreter); on a GPU the real pinned buffers, copy stream and events run.
@pytest.mark.parametrize("source,dtype,algorithm", [
    ("npy", torch.float64, "scaling"), ("npy", torch.float32, "log"), ("tensor", torch.float32, "scaling"),
    ("tensor", torch.float64, "log"), ("half", torch.float32, "log"), ("pinned", torch.float32, "scaling"),
    ("callable", torch.float64, "log")])
def test_chunked_through_triton_passes(tmp_path, monkeypatch, algorithm, dtype, source):
    import numpy as np

    from selflabel import select
    from selflabel.backends import chunked
    from selflabel.backends.triton import TritonBackend
    from selflabel.source import make_source

    if not ON_GPU:
        monkeypatch.setattr(select, "for_blocks", lambda device, reader_thread=False: TritonBackend())
    n, k, h = (23, 7, 2) if not ON_GPU else (300_001, 1000, 2)
    scores = make_scores(n * h, k, kind="probs", temperature=2.0, dead=1, dead_margin=0.5, dtype=torch.float64,
                         seed=3).view(h, n, k)
    if source == "half":
        scores = scores.half().double()  # the solve below reads float16 storage: compare on the same values
    host = {"npy": scores, "tensor": scores.to(dtype), "pinned": scores.to(dtype), "half": scores.half(),
            "callable": scores}[source]
    if source == "pinned":
        if not ON_GPU:
            pytest.skip("pinned host memory needs CUDA")
        host = host.pin_memory()
    if source == "npy":
        np.save(tmp_path / "s.npy", host.numpy())
        host = str(tmp_path / "s.npy")
    rows = 10 if not ON_GPU else 65_536  # ragged last block either way
    if source == "callable":  # the user's blocks are longer than the budget's: the GPU feed splits them
        step = 2 * rows + 3
        host = lambda: (scores[:, lo:lo + step] for lo in range(0, n, step))  # noqa: E731
    budget = chunked.budget_for_rows(make_source(host), dtype, rows)
    opts = dict(kind="probs", lamb=10.0, algorithm=algorithm, dtype=dtype, tol=0, max_iter=12)
    got = sl.sinkhorn_knopp(host, backend="chunked", memory_budget=budget, device=DEV, **opts)
    ref = sl.sinkhorn_knopp(scores, backend="cpu", **opts)
    assert got.backend == "chunked" and got.n_iter == 12 and got.labels.device.type == DEV
    assert (got.labels.cpu() == ref.labels).float().mean() >= 0.999
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    assert torch.allclose(got.log_v.cpu().double(), ref.log_v.double(), **tol)
    assert torch.allclose(got.log_u.cpu().double(), ref.log_u.double(), **tol)
    assert abs(got.error - ref.error) <= 1e-5


def test_chunked_device_errors():
    scores = torch.rand(20, 4)
    with pytest.raises(ValueError, match="device"):
        sl.sinkhorn_knopp(scores, backend="chunked", memory_budget="80MB", device="tpu")
    if not ON_GPU:
        with pytest.raises(ValueError, match="CUDA is not available"):
            sl.sinkhorn_knopp(scores, backend="chunked", memory_budget="80MB", device="cuda")


def test_launchers_check_what_the_kernels_assume():
    """The kernels index every tensor as dense row-major: the launchers refuse strided views, a dtype,
    shape or device that differs from the matrix's, other matrix dtypes and empty matrices, naming the
    argument, before any launch."""
    M = torch.rand(1, 6, 5, device=DEV)
    a, u, v = torch.rand(6, device=DEV), torch.rand(1, 6, device=DEV), torch.rand(1, 5, device=DEV)
    with pytest.raises(ValueError, match=r"scaling_pass: M must be contiguous .*M.contiguous\(\)"):
        scaling.scaling_pass(torch.rand(1, 5, 6, device=DEV).transpose(1, 2), a, u, v)
    with pytest.raises(ValueError, match="scaling_pass: a must be torch.float32 like the matrix, got torch.float64"):
        scaling.scaling_pass(M, a.double(), u, v)
    with pytest.raises(ValueError, match=r"scaling_pass: u must be contiguous"):
        scaling.scaling_pass(M, a, torch.rand(1, 12, device=DEV)[:, ::2], v)
    with pytest.raises(ValueError, match=r"scaling_pass: v must have shape \(1, 5\), got \(1, 4\)"):
        scaling.scaling_pass(M, a, u, v[:, :4].contiguous())
    with pytest.raises(ValueError, match="scaling_pass: M must be one of torch.float32, torch.float64"):
        scaling.scaling_pass(M.half(), a.half(), u.half(), v.half())
    with pytest.raises(ValueError, match="empty matrix"):
        scaling.scaling_pass(M[:, :0], a[:0], u[:, :0], v)
    with pytest.raises(ValueError, match=r"log_pass: g must be contiguous"):
        logdomain.log_pass(M, a, u.clone(), torch.rand(1, 10, device=DEV)[:, ::2])
    with pytest.raises(ValueError, match=r"prepare: scores must be one of"):
        prepare.prepare(M.to(torch.bfloat16), 5.0, False, True)
    with pytest.raises(ValueError, match=r"labels: log_v must be an \(H, K\) = \(1, 5\) tensor"):
        labels_k.labels(M, torch.zeros(5, device=DEV), False)
    with pytest.raises(ValueError, match="labels: mat must be contiguous"):
        labels_k.labels(M[:, :, :4], torch.zeros(1, 4, device=DEV), False)
    x, w = torch.rand(6, 3, device=DEV), torch.rand(5, 3, device=DEV)
    f, g, m = torch.zeros(6, device=DEV), torch.zeros(5, device=DEV), torch.zeros(6, device=DEV)
    with pytest.raises(ValueError, match="implicit_log_pass: x must be contiguous"):
        implicit.implicit_log_pass(torch.rand(3, 6, device=DEV).T, w, None, 1.0, m, f, f.clone(), g)
    with pytest.raises(ValueError, match="implicit_log_pass: f must be torch.float64, got torch.float32"):
        implicit.implicit_log_pass(x.double(), w.double(), None, 1.0, m.double(), f.double(), f, g.double())
    with pytest.raises(ValueError, match=r"implicit_log_pass: bias must have shape \(5,\)"):
        implicit.implicit_log_pass(x, w, torch.zeros(4, device=DEV), 1.0, m, f, f.clone(), g)
