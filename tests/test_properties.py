"""Property tests over random problems: whatever the shape, dtype, lamb, marginals and
backend, the duals are finite, the reported error is the error of the returned plan, and
a converged result's plan has total mass 1 and column error within tol (rows exact, up to
the rounding of the duals in the compute dtype). Inputs are never modified."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import log_sinkhorn, marginal_errors

import selflabel as sl

TOL = 1e-5
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw):
    n = draw(st.integers(2, 48))
    k = draw(st.integers(2, 12))
    heads = draw(st.sampled_from([1, 1, 2]))
    kind = draw(st.sampled_from(["logits", "probs"]))
    scale = draw(st.floats(0.05, 4.0))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((heads, n, k)) * scale
    if kind == "logits" and draw(st.booleans()):  # masked entries: -inf, keeping every row and column alive
        mask = rng.random((heads, n, k)) < 0.25
        mask[:, np.arange(n), rng.integers(k, size=n)] = False
        mask[:, rng.integers(n, size=k), np.arange(k)] = False
        x = np.where(mask, -np.inf, x)
    if kind == "probs":
        x = np.exp(x - x.max(-1, keepdims=True))
        x /= x.sum(-1, keepdims=True)
    a = rng.uniform(0.2, 5.0, n) if draw(st.booleans()) else None
    b = rng.uniform(0.2, 5.0, k) if draw(st.booleans()) else None
    return dict(
        x=x if heads == 2 else x[0], kind=kind, a=a, b=b,
        lamb=draw(st.floats(1.0, 100.0)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        backend=draw(st.sampled_from(["cpu", "torch", "chunked"])),
        algorithm=draw(st.sampled_from(["auto", "auto", "log"])),
    )


def _marginal(w: np.ndarray | None, n: int) -> torch.Tensor:  # normalised, float64
    w = np.full(n, 1.0) if w is None else w
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


@SETTINGS
@given(problems())
def test_converged_results_are_plans(p):
    x = torch.as_tensor(p["x"], dtype=p["dtype"])
    before = x.clone()
    res = sl.sinkhorn_knopp(x, kind=p["kind"], lamb=p["lamb"], row_marginal=p["a"], col_marginal=p["b"],
                            backend=p["backend"], algorithm=p["algorithm"], tol=TOL, max_iter=3000)
    assert torch.equal(x, before)
    assert res.log_v.dtype == p["dtype"]
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    k = x.shape[-1]
    assert res.labels.shape == x.shape[:-1] and int(res.labels.min()) >= 0 and int(res.labels.max()) < k
    mass, col, row, slack = marginal_errors(res, x, p["a"], p["b"])
    assert abs(col - res.error) <= slack + 0.02 * TOL, (col, res.error, slack)
    assert row <= slack, (row, slack)
    if res.converged:
        assert mass <= TOL + slack and col <= TOL + slack, (mass, col, slack)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_float64_plans_match_an_independent_reference(p):
    if p["x"].ndim == 3:
        p["x"] = p["x"][0]
    x = torch.as_tensor(p["x"], dtype=torch.float64)
    res = sl.sinkhorn_knopp(x, kind=p["kind"], lamb=p["lamb"], row_marginal=p["a"], col_marginal=p["b"],
                            backend=p["backend"], tol=1e-9, max_iter=20_000)
    if not res.converged:
        return  # slow cases (lamb 100, N close to K): the invariants above still hold
    logk = p["lamb"] * (np.log(p["x"]) if p["kind"] == "probs" else p["x"])
    try:
        q_ref, _ = log_sinkhorn(logk, _marginal(p["a"], len(x)).numpy(), _marginal(p["b"], x.shape[1]).numpy(),
                                tol=1e-10, max_iter=50_000)
    except RuntimeError:
        return
    q = res.plan(scores=x).numpy()
    assert np.abs(q - q_ref).sum() <= 1e-7


@pytest.mark.parametrize("backend", ["cpu", "torch", "chunked"])
def test_property_checker_catches_a_wrong_plan(backend, monkeypatch):
    """The invariant above fails when the duals returned are not those the error was measured on."""
    x = torch.randn(30, 5, dtype=torch.float64)
    res = sl.sinkhorn_knopp(x, backend=backend)
    res.log_v = res.log_v + torch.linspace(0, 0.01, 5, dtype=torch.float64)
    q = res.plan(scores=x)
    assert (q.sum(0) - 0.2).abs().sum() > 10 * TOL


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_results_are_plans(p):
    """The same invariant on the Triton kernels (in the interpreter without a GPU: small cases)."""
    x = torch.as_tensor(p["x"], dtype=p["dtype"])
    x = x[..., :16, :] if x.shape[-2] > 16 else x
    res = sl.sinkhorn_knopp(x, kind=p["kind"], lamb=p["lamb"], col_marginal=p["b"], backend="triton",
                            algorithm=p["algorithm"], tol=TOL, max_iter=150)
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    mass, col, row, slack = marginal_errors(res, x, None, p["b"])
    assert abs(col - res.error) <= slack + 0.02 * TOL and row <= slack, (col, res.error, row, slack)
    if res.converged:
        assert mass <= TOL + slack and col <= TOL + slack
