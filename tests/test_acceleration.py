"""Over-relaxed Sinkhorn-Knopp: the safeguard never loses, the kernels relax as the torch
reference does, the dual objective rises at every half-step, and the accelerated solver
reaches the plain solver's fixed point (labels and duals) on random problems."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import log_sinkhorn

import selflabel as sl
from selflabel.accel import OMEGA_MAX, Relaxation, optimal_omega, relaxed_step
from selflabel.backends.cpu import CpuBackend
from selflabel.backends.torch_ref import TorchBackend
from selflabel.synthetic import make_scores


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.floats(-30, 30), st.floats(1.0, 1.999))
def test_relaxed_step_never_loses_against_the_plain_step(y, omega):
    s = float(relaxed_step(torch.tensor([y], dtype=torch.float64), omega)[0])
    assert s in (omega * y, y)
    # gain of a step s for a coordinate of mass 1 whose plain log step is y: e^y s - e^s + 1
    assert math.exp(y) * s - math.exp(s) + 1 >= -1e-12 * max(1.0, math.exp(y))
    if y <= 0:
        assert s == omega * y


def test_relaxed_step_keeps_dtype_and_plain_factor_is_identity():
    y = torch.linspace(-5, 5, 11, dtype=torch.float32)
    assert relaxed_step(y, 1.7).dtype == torch.float32
    assert relaxed_step(y, 1.0) is y


def _young_rate(lam: float, omega: float) -> float:
    """The asymptotic rate of over-relaxation at ``omega`` below its optimum, plain rate ``lam``."""
    return ((omega * math.sqrt(lam) + math.sqrt(omega * omega * lam - 4 * (omega - 1))) / 2) ** 2


def test_relaxation_follows_the_measured_rate():
    relax = Relaxation(True)
    err = 1.0
    relax.observe(0, err)
    assert relax.omega(check=False) == 1.0  # plain until a window measured a rate
    err *= 0.99**10
    relax.observe(10, err)  # the first plain window sets omega
    assert relax.omega(check=False) == pytest.approx(optimal_omega(0.99))
    assert relax.omega(check=True) == 1.0  # a pass ending at a check runs plain
    # a true plain rate 0.999: one relaxed window shrinks 1 - lam at most fourfold, two that agree give it
    w = relax.omega_now
    err *= _young_rate(0.999, w) ** 10
    relax.observe(20, err)
    assert relax.lam == pytest.approx(1 - 0.01 / 4)
    for k in (30, 40, 50):
        err *= _young_rate(0.999, relax.omega_now) ** 10
        relax.observe(k, err)
    assert relax.lam == pytest.approx(0.999, rel=1e-9)
    assert relax.omega_now == pytest.approx(optimal_omega(0.999))
    # a window contracting by omega - 1 or faster: omega is at or past its optimum, so it steps down
    before = relax.omega_now
    err *= (before - 1.05) ** 10
    relax.observe(60, err)
    assert relax.omega_now < before and relax.lam == pytest.approx(1 - 10 * 0.001)
    before = relax.omega_now
    relax.observe(70, 10 * err)  # the error grew: back off
    assert relax.omega_now == pytest.approx(1 + 0.5 * (before - 1))
    relax.observe(80, 0.9995 * 10 * err)  # a plateau teaches nothing
    assert relax.omega_now == pytest.approx(1 + 0.5 * (before - 1))


def test_plateaus_do_not_set_omega():
    relax = Relaxation(True)
    relax.observe(0, 1.0)
    relax.observe(10, 0.9999)  # error down by 0.01%: skipped
    relax.observe(20, 0.9998)
    assert relax.omega(check=False) == 1.0


def test_disabled_relaxation_stays_plain():
    relax = Relaxation(False)
    for k in (10, 20, 30):
        relax.observe(k, 0.9**k)
    assert relax.omega(check=False) == 1.0


def _pass_inputs(dtype, seed, scores_mode=False):
    gen = torch.Generator().manual_seed(seed)
    H, N, K = 2, 37, 11
    s = torch.randn(H, N, K, dtype=torch.float64, generator=gen) * 2
    L = (s - s.amax(-1, keepdim=True)).to(dtype)
    a = (torch.rand(N, dtype=torch.float64, generator=gen) + 0.1).to(dtype)
    a /= a.sum()
    v = (torch.rand(H, K, generator=gen, dtype=torch.float64) * 3 + 0.05).to(dtype)
    u = (torch.rand(H, N, generator=gen, dtype=torch.float64) * 3 + 0.05).to(dtype) * a
    return L, a, u, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("omega", [1.0, 1.5, 1.95])
def test_cpu_passes_relax_like_the_reference(dtype, omega):
    L, a, u0, v = _pass_inputs(dtype, seed=int(omega * 100))
    cpu, ref = CpuBackend(threads=1), TorchBackend()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    M = torch.exp(L)
    u_c, u_r = u0.clone(), u0.clone()
    w_c, ch_c = cpu.scaling_pass(M, a, u_c, v, omega)
    w_r, ch_r = ref.scaling_pass(M, a, u_r, v, omega)
    assert torch.allclose(u_c, u_r, **tol) and torch.allclose(w_c, w_r, **tol)
    assert torch.allclose(ch_c, ch_r, rtol=1e-4)
    f0, g = torch.log(u0), torch.log(v)
    f_c, f_r = f0.clone(), f0.clone()
    lw_c, ch_c = cpu.log_pass(L, torch.log(a), f_c, g, omega)
    lw_r, ch_r = ref.log_pass(L, torch.log(a), f_r, g, omega)
    atol = 2e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(f_c, f_r, atol=atol, rtol=0) and torch.allclose(lw_c, lw_r, atol=4 * atol, rtol=0)
    if omega != 1.0:  # the relaxed pass differs from the plain one where the safeguard lets it
        f_p = f0.clone()
        ref.log_pass(L, torch.log(a), f_p, g)
        assert not torch.allclose(f_p, f_r)


def test_cpu_rejects_a_relaxation_factor_out_of_range():
    L, a, u, v = _pass_inputs(torch.float64, seed=0)
    for omega in (0.5, 2.0, float("nan")):
        with pytest.raises(RuntimeError, match="omega"):
            CpuBackend(threads=1).scaling_pass(torch.exp(L), a, u.clone(), v, omega)


def _dual(L, log_a, log_b, f, g):
    """<a, f> + <b, g> - sum exp(L + f + g) per head, float64."""
    L, f, g = L.double(), f.double(), g.double()
    mass = torch.exp(L + f[..., None] + g[:, None, :]).sum((-1, -2))
    return (log_a.exp().double() * f).sum(-1) + (log_b.exp().double() * g).sum(-1) - mass


@pytest.mark.parametrize("backend", [CpuBackend(threads=1), TorchBackend()], ids=["cpu", "torch"])
@pytest.mark.parametrize("form", ["scaling", "log"])
@pytest.mark.parametrize("seed", range(4))
def test_the_dual_objective_rises_at_every_half_step(backend, form, seed):
    """At the largest relaxation factor, from a start far from the solution (column potentials
    spread over e^+-6), in float64: the objective never falls and nothing turns NaN."""
    gen = torch.Generator().manual_seed(seed)
    H, N, K = 1, 60, 9
    L = torch.randn(H, N, K, dtype=torch.float64, generator=gen) * (1 + 3 * seed)
    L = L - L.amax(-1, keepdim=True)
    log_a = torch.full((N,), -math.log(N), dtype=torch.float64)
    log_b = torch.full((H, K), -math.log(K), dtype=torch.float64)
    f = log_a.repeat(H, 1)
    g = (torch.rand(H, K, generator=gen, dtype=torch.float64) - 0.5) * 12
    before = _dual(L, log_a, log_b, f, g)
    for _ in range(60):
        if form == "scaling":
            u = torch.exp(f)
            w, _ = backend.scaling_pass(torch.exp(L), log_a.exp(), u, torch.exp(g), OMEGA_MAX)
            f = torch.log(u)
            logw = torch.log(w) + g
        else:
            logw, _ = backend.log_pass(L, log_a, f, g, OMEGA_MAX)
        mid = _dual(L, log_a, log_b, f, g)
        g = g + relaxed_step(log_b - logw, OMEGA_MAX)
        after = _dual(L, log_a, log_b, f, g)
        assert torch.isfinite(f).all() and torch.isfinite(g).all()
        slack = 1e-12 * after.abs()
        assert (mid >= before - slack).all() and (after >= mid - slack).all(), (before, mid, after)
        before = after


@st.composite
def problems(draw):
    n = draw(st.integers(3, 40))
    k = draw(st.integers(2, 10))
    heads = draw(st.sampled_from([1, 1, 2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((heads, n, k)) * draw(st.floats(0.1, 3.0))
    return dict(
        x=x if heads == 2 else x[0], lamb=draw(st.floats(1.0, 60.0)),
        a=rng.uniform(0.2, 5.0, n) if draw(st.booleans()) else None,
        b=rng.uniform(0.2, 5.0, k) if draw(st.booleans()) else None,
        algorithm=draw(st.sampled_from(["scaling", "log"])),
        backend=draw(st.sampled_from(["cpu", "torch", "chunked"])),
    )


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_accelerated_and_plain_reach_the_same_fixed_point(p):
    """float64 to tol 1e-10: the same duals (up to the constant) and plan as plain Sinkhorn-Knopp
    and as an independent reference, in no more iterations."""
    x = torch.as_tensor(p["x"], dtype=torch.float64)
    runs = {acc: sl.sinkhorn_knopp(x, lamb=p["lamb"], row_marginal=p["a"], col_marginal=p["b"],
                                   algorithm=p["algorithm"], backend=p["backend"], acceleration=acc,
                                   tol=1e-10, max_iter=100_000)
            for acc in ("none", "auto")}
    plain, fast = runs["none"], runs["auto"]
    assert fast.converged and fast.n_iter <= plain.n_iter
    if plain.converged:  # (plain may need more than 100,000 iterations, e.g. at N < K)
        shift = (fast.log_v - plain.log_v).mean(-1, keepdim=True)
        assert torch.allclose(fast.log_v - shift, plain.log_v, atol=1e-6)
        assert torch.allclose(fast.log_u + shift, plain.log_u, atol=1e-6)
    heads = x if x.dim() == 3 else x[None]
    for h in range(heads.shape[0]):
        a, b = (None if m is None else m / m.sum() for m in (p["a"], p["b"]))
        q_ref, _ = log_sinkhorn(p["lamb"] * heads[h].numpy(), a, b, tol=1e-11)
        q = fast.plan(scores=heads[h]) if x.dim() == 2 else fast.plan(scores=heads).numpy()[h]
        assert np.abs(np.asarray(q) - q_ref).sum() < 1e-7
    # labels agree wherever the plan's best cluster is clear of the runner-up
    lab_p, lab_f = plain.labels.reshape(-1, x.shape[-2]), fast.labels.reshape(-1, x.shape[-2])
    vals = (p["lamb"] * heads + fast.log_v.reshape(-1, 1, x.shape[-1])).double()
    top2 = vals.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(lab_f[clear], vals.argmax(-1)[clear])
    if plain.converged:
        assert torch.equal(lab_p[clear], lab_f[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["network", "square", "dead"])
def test_acceleration_takes_fewer_iterations_to_the_same_labels(dtype, case):
    """Network-like scores at the sizes of a test: at most half the plain iterations to 1e-5."""
    shape = {"network": (3000, 200, 0), "square": (400, 400, 0), "dead": (2000, 300, 3)}[case]
    P = make_scores(shape[0], shape[1], kind="probs", dead=shape[2], dtype=dtype, seed=3)
    plain = sl.sinkhorn_knopp(P, kind="probs", lamb=50, acceleration="none", max_iter=50_000)
    fast = sl.sinkhorn_knopp(P, kind="probs", lamb=50, max_iter=50_000)
    assert plain.converged and fast.converged
    assert fast.n_iter <= 0.5 * plain.n_iter, (fast.n_iter, plain.n_iter)
    assert (fast.labels == plain.labels).double().mean() >= 0.999


def test_acceleration_is_validated():
    with pytest.raises(ValueError, match="acceleration"):
        sl.sinkhorn_knopp(torch.randn(10, 3), acceleration="fast")
