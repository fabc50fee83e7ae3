"""The solver's promises on inputs outside the happy path: a converged result is a plan
whose marginals are within tol, duals are finite, results carry no autograd graph, and
every input the README accepts (masked logits, tiny marginals, strided arrays, numpy
scalars, coarse storage dtypes) gives the right answer or a clear error."""

import numpy as np
import pytest
import torch
from reference import log_sinkhorn, marginal_errors

import selflabel as sl

BACKENDS = ["cpu", "torch", "chunked", "triton"]  # triton runs in the interpreter without a GPU


def _sharp_probs(seed: int, n: int = 300, k: int = 20, scale: float = 2.0) -> torch.Tensor:
    """float32 softmaxes of Gaussian logits: at lamb 50-100 their kernel underflows float32."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    return torch.tensor(p / p.sum(1, keepdims=True), dtype=torch.float32)


def _assert_trustworthy(res, scores, tol, a=None, b=None):
    """Finite duals, the reported error is the plan's, and a converged plan is within tol."""
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    mass, col, row, slack = marginal_errors(res, scores, a, b)
    assert abs(col - res.error) <= slack + 0.02 * tol, f"reported error {res.error:.3g}, plan's {col:.3g}"
    assert row <= slack, f"rows off by {row:.3g} (resolution {slack:.3g})"
    if res.converged:
        assert mass <= tol + slack, f"plan mass off 1 by {mass:.3g}"
        assert col <= tol + slack, f"converged, but the plan's column error is {col:.3g} > tol {tol}"


# ---- converged float32 results are plans ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sharp_float32_probs_converge_to_a_plan(backend):
    """lamb=100 on float32 probabilities: the scaling kernel underflows where the duals need it."""
    p = _sharp_probs(1)
    res = sl.sinkhorn_knopp(p, kind="probs", lamb=100, max_iter=20_000, backend=backend)
    assert res.converged
    _assert_trustworthy(res, p, 1e-5)
    q_ref, _ = log_sinkhorn(100 * np.log(p.double().numpy()), tol=1e-6)
    assert (res.labels.numpy() == q_ref.argmax(1)).mean() >= 0.995


@pytest.mark.parametrize("seed", range(12))
def test_sharp_float32_cases_across_seeds(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(30, 400)), int(rng.integers(3, 40))
    p = _sharp_probs(seed, n, k, scale=3.0)
    lamb = float(rng.choice([50.0, 100.0]))
    res = sl.sinkhorn_knopp(p, kind="probs", lamb=lamb, max_iter=20_000)
    _assert_trustworthy(res, p, 1e-5)


def test_explicit_scaling_refuses_a_converged_answer_it_cannot_trust():
    """Without absorbed potentials (chunked mode) the scaling form converges on its flushed kernel:
    the exact check refuses that answer; with them (cpu) it reaches a true plan."""
    p = _sharp_probs(1)
    with pytest.raises(FloatingPointError, match="carry mass"):
        sl.sinkhorn_knopp(p, kind="probs", lamb=100, max_iter=20_000, algorithm="scaling", backend="chunked")
    res = sl.sinkhorn_knopp(p, kind="probs", lamb=100, max_iter=20_000, algorithm="scaling")
    assert res.converged and res.algorithm == "scaling"
    _assert_trustworthy(res, p, 1e-5)


def test_explicit_scaling_reports_the_exact_error_when_not_converged():
    p = _sharp_probs(1)
    res = sl.sinkhorn_knopp(p, kind="probs", lamb=100, max_iter=300, tol=0, algorithm="scaling")
    assert not res.converged
    _assert_trustworthy(res, p, 1e-5)


# ---- no autograd graph ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_results_carry_no_grad_graph(backend):
    s = torch.randn(20, 20, dtype=torch.float64, requires_grad=True)
    res = sl.sinkhorn_knopp(s, backend=backend)
    for t in (res.log_u, res.log_v, res.plan(), res.plan(normalize_rows=True)):
        assert not t.requires_grad and t.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        res.plan().sum().backward()
    assert s.grad is None


# ---- masked (-inf) logits ---------------------------------------------------------------------------


def _masked(n=60, k=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=dtype) * 2
    mask = torch.rand(n, k, generator=g) < 0.3
    mask[torch.arange(n), torch.randint(k, (n,), generator=g)] = False  # every row keeps one cluster
    return s.masked_fill(mask, float("-inf")), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_mean_no_mass(backend):
    s, mask = _masked(*((24, 5) if backend == "triton" else (60, 7)))
    res = sl.sinkhorn_knopp(s, lamb=5.0, tol=1e-9, max_iter=20_000, backend=backend)
    assert res.converged and torch.isfinite(res.log_v).all() and torch.isfinite(res.log_u).all()
    # the plan from the duals, independently of plan() (the chunked backend keeps no scores)
    q = torch.exp(5.0 * (s - s.amax(1, keepdim=True)) + res.log_u[:, None] + res.log_v[None, :])
    assert (q[mask] == 0).all()
    assert not mask[torch.arange(len(s)), res.labels].any()
    q_ref, _ = log_sinkhorn(5.0 * s.numpy(), tol=1e-11)
    assert np.abs(q.numpy() - q_ref).sum() <= 1e-7
    probs = torch.softmax(5.0 * s, 1)  # the same problem given as probabilities with zeros
    via_probs = sl.sinkhorn_knopp(probs, kind="probs", lamb=1.0, tol=1e-9, max_iter=20_000, backend=backend)
    assert torch.equal(via_probs.labels, res.labels)


@pytest.mark.parametrize("backend", ["cpu", "torch", "chunked"])
def test_all_minus_inf_row_or_column_is_a_clear_error(backend):
    s, _ = _masked()
    row = s.clone()
    row[4] = float("-inf")
    with pytest.raises(ValueError, match="row 4 .*-inf for every cluster"):
        sl.sinkhorn_knopp(row, backend=backend)
    col = s.clone()
    col[:, 2] = float("-inf")
    with pytest.raises(ValueError, match="cluster 2 .*no mass"):
        sl.sinkhorn_knopp(col, backend=backend)
    both = s.clone()
    both[3, 1], both[3, 2] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"NaN or \+inf \(row 3"):
        sl.sinkhorn_knopp(both, backend=backend)


# ---- tiny marginals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [1e-30, 1e-46, 1e-200])
def test_tiny_column_marginal_gives_finite_duals(dtype, tiny):
    s = torch.randn(80, 6, dtype=dtype)
    b = np.full(6, 1.0)
    b[2] = tiny
    b /= b.sum()
    res = sl.sinkhorn_knopp(s, col_marginal=b, max_iter=5000)
    assert res.converged
    _assert_trustworthy(res, s, 1e-5, b=b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [1e-30, 1e-46, 1e-200])
def test_tiny_row_marginal_gives_finite_duals(dtype, tiny):
    s = torch.randn(80, 6, dtype=dtype)
    a = np.full(80, 1.0)
    a[[4, 9]] = tiny
    a /= a.sum()
    res = sl.sinkhorn_knopp(s, row_marginal=a, max_iter=5000)
    assert res.converged
    _assert_trustworthy(res, s, 1e-5, a=a)


def test_tiny_marginal_with_explicit_scaling_names_the_marginal():
    a = np.full(80, 1.0)
    a[4] = 1e-46
    with pytest.raises(ValueError, match="row_marginal.*algorithm='log'"):
        sl.sinkhorn_knopp(torch.randn(80, 6), row_marginal=a / a.sum(), algorithm="scaling")


# ---- strided, integer and numpy-scalar inputs ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch", "chunked"])
def test_negative_stride_arrays(tmp_path, backend):
    x = np.random.default_rng(3).standard_normal((90, 5)).astype(np.float32)
    ref = sl.sinkhorn_knopp(np.ascontiguousarray(x[::-1, ::-1]), backend=backend)
    got = sl.sinkhorn_knopp(x[::-1, ::-1], backend=backend)
    assert torch.equal(got.labels, ref.labels)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    flipped = sl.sinkhorn_knopp(mm[::-1], backend=backend)
    assert torch.equal(flipped.labels, sl.sinkhorn_knopp(np.ascontiguousarray(x[::-1]), backend=backend).labels)


def test_negative_stride_features():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((70, 8)), rng.standard_normal((5, 8))
    got = sl.sinkhorn_knopp_features(x[::-1], w)
    assert torch.equal(got.labels, sl.sinkhorn_knopp_features(np.ascontiguousarray(x[::-1]), w).labels)


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
@pytest.mark.parametrize("make", [
    lambda p: torch.ones(8, 3, dtype=torch.int64),
    lambda p: torch.ones(8, 3, dtype=torch.bool),
    lambda p: np.ones((8, 3), dtype=np.int16),
    lambda p: np.lib.format.open_memmap(p, mode="w+", dtype=np.int32, shape=(8, 3))[1:],
], ids=["int64-tensor", "bool-tensor", "int16-array", "int32-memmap-slice"])
def test_non_float_scores_refused_in_every_mode(tmp_path, backend, make):
    with pytest.raises(TypeError, match="scores must be floating point"):
        sl.sinkhorn_knopp(make(tmp_path / "i.npy"), backend=backend)


def test_numpy_scalars_as_options():
    s = torch.randn(50, 4)
    ref = sl.sinkhorn_knopp(s, lamb=25.0, max_iter=100, tol=1e-6, check_every=5)
    got = sl.sinkhorn_knopp(s, lamb=np.float32(25), max_iter=np.int64(100), tol=np.float64(1e-6),
                            check_every=np.int32(5))
    assert torch.equal(got.labels, ref.labels) and got.n_iter == ref.n_iter
    for bad in (np.float64(2.5), np.bool_(True)):
        with pytest.raises(ValueError, match="max_iter"):
            sl.sinkhorn_knopp(s, max_iter=bad)


def test_float64_extremes_are_solved_not_called_nan():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((40, 4))
    s[rng.random((40, 4)) < 0.2] = -1.7e308  # far below the row maxima: no mass, like -inf
    s[np.arange(40), rng.integers(4, size=40)] = 1.7e308 * rng.random(40)
    res = sl.sinkhorn_knopp(s, tol=1e-9, max_iter=10_000)
    assert np.isfinite(res.log_v.numpy()).all()
    masked = np.where(s < -1e300, -np.inf, s)
    assert torch.equal(res.labels, sl.sinkhorn_knopp(masked, tol=1e-9, max_iter=10_000).labels)
    with pytest.raises(ValueError, match="beyond the range of torch.float32.*dtype=torch.float64"):
        sl.sinkhorn_knopp(s, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(40, 4), (37, 5), (12, 12)])
def test_equal_rows_get_balanced_labels(backend, n, k):
    """Ties go round the clusters: row i takes the first tied cluster at or after i mod K."""
    for scores, kind in ((torch.zeros(n, k), "logits"), (torch.full((n, k), 1.0 / k), "probs"),
                         (torch.randn(1, k).expand(n, k).contiguous(), "logits")):
        res = sl.sinkhorn_knopp(scores, kind=kind, backend=backend)
        sizes = torch.bincount(res.labels, minlength=k)
        assert sizes.max() - sizes.min() <= 1, sizes
    tied = torch.zeros(n, k)  # every row ties: row i takes cluster i mod k
    assert torch.equal(sl.sinkhorn_knopp(tied, backend=backend).labels, torch.arange(n) % k)


def test_tie_rule_uses_global_row_index_in_chunked_blocks():
    tied = torch.zeros(103, 7)
    whole = sl.sinkhorn_knopp(tied).labels
    blocks = sl.sinkhorn_knopp(tied, backend="chunked", memory_budget=sl.backends.chunked.FIXED_OVERHEAD + 2**19)
    assert torch.equal(blocks.labels, whole)


# ---- coarse storage dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_half_precision_softmaxes_are_probabilities(dtype, backend):
    g = torch.Generator().manual_seed(8)
    for _ in range(20):
        k = int(torch.randint(2, 600, (1,), generator=g))
        p = torch.softmax(torch.randn(64, k, generator=g) * 3, 1).to(dtype)
        res = sl.sinkhorn_knopp(p, kind="probs", backend=backend, max_iter=50)
        assert torch.isfinite(res.log_v).all()
    with pytest.raises(ValueError, match="summing to 1"):
        sl.sinkhorn_knopp((torch.softmax(torch.randn(64, 10), 1) * 1.05).to(dtype), kind="probs", backend=backend)


# ---- input unchanged ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_modified(backend):
    s, _ = _masked(dtype=torch.float32)
    a = np.linspace(1, 2, len(s))
    b = np.linspace(1, 3, s.shape[1])
    copies = (s.clone(), a.copy(), b.copy())
    sl.sinkhorn_knopp(s, row_marginal=a / a.sum(), col_marginal=b / b.sum(), backend=backend, max_iter=30)
    assert torch.equal(s, copies[0]) and np.array_equal(a, copies[1]) and np.array_equal(b, copies[2])
