"""The solver against the independent float64 reference and POT, on many shapes."""

import numpy as np
import ot
import pytest
import torch
from reference import log_scores, log_sinkhorn

import selflabel as sl
from selflabel.synthetic import make_scores

# (N, K, lamb, temperature, dead, kind)
CASES = [
    (60, 60, 10.0, 2.0, 0, "logits"),  # N ~ K
    (3000, 12, 25.0, 4.0, 0, "log_probs"),  # N >> K
    (400, 2, 25.0, 2.0, 0, "logits"),  # K = 2
    (500, 40, 25.0, 5.0, 4, "probs"),  # dead clusters nobody prefers
    (300, 17, 1.0, 3.0, 0, "logits"),  # lamb = 1
    (257, 31, 100.0, 0.5, 2, "log_probs"),  # lamb = 100, dead clusters
]


def _labels_agree(labels, q_ref, tol=1e-9):
    """Labels equal the reference argmax except at exact ties of the optimal plan."""
    labels = np.asarray(labels)
    ref = q_ref.argmax(1)
    diff = labels != ref
    rows = np.nonzero(diff)[0]
    gaps = q_ref[rows, ref[rows]] - q_ref[rows, labels[rows]]
    return bool(np.all(gaps <= tol * q_ref[rows].max(1)))


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-K{c[1]}-lamb{c[2]:g}-dead{c[4]}-{c[5]}" for c in CASES])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("algorithm", ["scaling", "log", "auto"])
def test_matches_float64_reference(case, backend, algorithm):
    n, k, lamb, temp, dead, kind = case
    scores = make_scores(n, k, kind=kind, temperature=temp, dead=dead, dead_margin=0.5, dtype=torch.float64, seed=n)
    logk = lamb * log_scores(scores.numpy(), kind)
    q_ref, _ = log_sinkhorn(logk)
    if algorithm == "scaling" and (logk.max(0) - logk.max(1).max()).min() < -600:
        pytest.skip("the scaling form cannot represent this kernel in float64 (auto covers it)")
    res = sl.sinkhorn_knopp(scores, lamb=lamb, kind=kind, backend=backend, algorithm=algorithm,
                            tol=1e-10, max_iter=200_000)
    assert res.converged and res.error <= 1e-10
    q = res.plan().numpy()
    assert np.allclose(q.sum(1), 1.0 / n, rtol=1e-9, atol=0)
    assert np.abs(q.sum(0) - 1.0 / k).sum() <= 1e-10
    assert np.abs(q - q_ref).sum() <= 1e-7
    assert _labels_agree(res.labels.numpy(), q_ref)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_non_uniform_marginals(backend):
    n, k, lamb = 400, 9, 20.0
    gen = np.random.default_rng(1)
    a = gen.uniform(0.5, 2.0, n)
    a /= a.sum()
    b = gen.dirichlet(np.ones(k) * 2)
    scores = make_scores(n, k, temperature=3.0, dtype=torch.float64, seed=3)
    q_ref, _ = log_sinkhorn(lamb * scores.numpy(), a, b)
    for algorithm in ("scaling", "log"):
        res = sl.sinkhorn_knopp(scores, lamb=lamb, row_marginal=a, col_marginal=torch.tensor(b), backend=backend,
                                algorithm=algorithm, tol=1e-11, max_iter=100_000)
        q = res.plan().numpy()
        assert np.allclose(q.sum(1), a, rtol=1e-9)
        assert np.abs(q.sum(0) - b).sum() <= 1e-11
        assert np.abs(q - q_ref).sum() <= 1e-8


@pytest.mark.parametrize("dtype,tol,plan_tol", [(torch.float32, 1e-5, 3e-4), (torch.float64, 1e-10, 1e-7)])
@pytest.mark.parametrize("algorithm", ["scaling", "log"])
def test_float32_and_float64_reach_the_reference(dtype, tol, plan_tol, algorithm):
    n, k, lamb = 2000, 50, 25.0
    scores = make_scores(n, k, kind="log_probs", temperature=4.0, dtype=torch.float64, seed=7)
    q_ref, _ = log_sinkhorn(lamb * scores.numpy())
    res = sl.sinkhorn_knopp(scores.to(dtype), lamb=lamb, algorithm=algorithm, tol=tol, max_iter=100_000)
    assert res.log_v.dtype == dtype and res.converged
    q = res.plan().double().numpy()
    assert np.abs(q - q_ref).sum() <= plan_tol
    agree = (res.labels.numpy() == q_ref.argmax(1)).mean()
    assert agree >= (0.995 if dtype == torch.float32 else 1.0)


@pytest.mark.parametrize("algorithm", ["scaling", "log"])
def test_against_pot(algorithm):
    n, k, lamb = 300, 8, 5.0
    scores = make_scores(n, k, kind="log_probs", temperature=3.0, dtype=torch.float64, seed=11)
    s = scores.numpy()
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    q_pot = ot.sinkhorn(a, b, -s, reg=1.0 / lamb, numItermax=100_000, stopThr=1e-13)
    q_pot_log = ot.bregman.sinkhorn_log(a, b, -s, reg=1.0 / lamb, numItermax=100_000, stopThr=1e-13)
    res = sl.sinkhorn_knopp(scores, lamb=lamb, kind="log_probs", algorithm=algorithm, tol=1e-12, max_iter=100_000)
    q = res.plan().numpy()
    assert np.abs(q - q_pot).sum() <= 1e-8
    assert np.abs(q - q_pot_log).sum() <= 1e-8
    assert (res.labels.numpy() == q_pot.argmax(1)).all()
