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
from selflabel.accel import LEAD, OMEGA_MAX, STEP_DOWN, Relaxation, optimal_omega, relaxed_step, young_lam
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
    """The asymptotic rate of over-relaxation at ``omega`` for plain rate ``lam``: Young's below the
    optimum, ``omega - 1`` at or past it."""
    disc = omega * omega * lam - 4 * (omega - 1)
    return ((omega * math.sqrt(lam) + math.sqrt(disc)) / 2) ** 2 if disc > 0 else omega - 1


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(0.5, 0.99999), st.floats(0.05, 0.999), st.integers(1, 30), st.integers(0, 4))
def test_young_lam_inverts_a_window_of_relaxed_and_plain_passes(lam, share, relaxed, plain_halves):
    omega = 1.0 + share * (optimal_omega(lam) - 1.0)  # below the optimum: Young's relation holds
    plain = 0.5 * plain_halves
    log_fall = relaxed * math.log(_young_rate(lam, omega)) + plain * math.log(lam)
    assert young_lam(log_fall, relaxed, plain, omega) == pytest.approx(lam, rel=1e-9, abs=1e-12)
    # a window that fell at least as fast as omega's optimum allows: omega is at or past its optimum
    w = optimal_omega(lam)
    assert young_lam(relaxed * math.log(0.999 * (w - 1)) + plain * math.log(lam), relaxed, plain, w) is None


def _window(relax: Relaxation, err: float, lam: float, n: int = 10, check_halves: int = 1) -> float:
    """``n`` passes against a model with plain rate ``lam``: each half-step asks ``relax`` for its
    factor (the last ``check_halves`` are plain, as around a check); returns the error after them."""
    log_err = math.log(err)
    for i in range(2 * n):
        plain = i >= 2 * n - check_halves
        omega = relax.omega(plain=plain)
        assert omega == 1.0 or not plain
        log_err += 0.5 * math.log(lam if omega == 1.0 else _young_rate(lam, omega))
    return math.exp(log_err)


def test_relaxation_follows_the_measured_rate():
    relax = Relaxation(True)
    err = 1.0
    relax.observe(0, err)
    assert relax.omega(plain=False) == 1.0  # plain until a window measured a rate
    err = _window(relax, err, 0.99)
    relax.observe(10, err)  # the first plain window sets omega, ahead of the measured rate
    assert relax.lam == pytest.approx(0.99)
    assert relax.omega(plain=False) == pytest.approx(optimal_omega(1 - LEAD * 0.01))
    # a true plain rate 0.999: one relaxed window shrinks 1 - lam at most fourfold, two that agree give it
    err = _window(relax, err, 0.999)
    relax.observe(20, err)
    assert relax.lam == pytest.approx(1 - 0.01 / 4)
    err = _window(relax, err, 0.999, check_halves=2)
    relax.observe(30, err)
    assert relax.lam == pytest.approx(0.999, rel=1e-9)
    assert relax.omega_now == pytest.approx(optimal_omega(1 - LEAD * 0.001))
    # that omega is past the optimum of 0.999, so the next window contracts by omega - 1: it steps down
    before = relax.omega_now
    err = _window(relax, err, 0.999)
    relax.observe(40, err)
    assert relax.lam == pytest.approx(1 - STEP_DOWN * 0.001)
    # no longer led past the rate that proved too high: omega is that rate's optimum
    assert relax.omega_now == pytest.approx(optimal_omega(0.999)) and relax.omega_now < before
    before = relax.omega_now
    relax.observe(70, 10 * err)  # the error grew: back off
    assert relax.omega_now == pytest.approx(1 + 0.5 * (before - 1))
    relax.observe(80, 0.9995 * 10 * err)  # a plateau teaches nothing
    assert relax.omega_now == pytest.approx(1 + 0.5 * (before - 1))


@pytest.mark.parametrize("lam", [0.8, 0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("first", [0.5, 0.9, 0.999])
def test_relaxation_nears_the_best_fixed_omega_on_a_stationary_rate(lam, first):
    """The plain rate is ``first`` in the first window (early windows fall at other rates), then
    ``lam``: over 30 windows the policy contracts the error at least 65% as much (in log) as the
    best fixed omega would."""
    relax = Relaxation(True)
    relax.observe(0, 1.0)
    err = _window(relax, 1.0, first)
    relax.observe(10, err)
    start = math.log(err)
    for k in range(20, 320, 10):
        err = _window(relax, err, lam, check_halves=2)
        relax.observe(k, err)
    best = 30 * (9 * math.log(optimal_omega(lam) - 1) + math.log(lam))
    assert math.log(err) - start <= 0.65 * best


def test_plateaus_do_not_set_omega():
    relax = Relaxation(True)
    relax.observe(0, 1.0)
    relax.observe(10, 0.9999)  # error down by 0.01%: skipped
    relax.observe(20, 0.9998)
    assert relax.omega(plain=False) == 1.0


def test_disabled_relaxation_stays_plain():
    relax = Relaxation(False)
    for k in (10, 20, 30):
        relax.observe(k, 0.9**k)
    assert relax.omega(plain=False) == 1.0


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


def test_relaxation_takes_an_exact_zero_error():
    relax = Relaxation(True)
    relax.observe(0, 1.0)
    relax.observe(10, 0.5)
    relax.observe(20, 0.0)  # converged exactly: nothing to learn, no failure
    relax.observe(30, 0.0)
    assert 1.0 < relax.omega(plain=False) < 2.0


def test_young_lam_of_an_all_plain_window_is_its_rate():
    assert young_lam(20 * math.log(0.97), 0, 20.0, 1.6) == pytest.approx(0.97)


@pytest.mark.parametrize("criterion", ["marginal", "sela"])
@pytest.mark.parametrize("check_every", [1, 3, 10])
def test_which_half_steps_run_plain(criterion, check_every):
    """Row updates of passes that end at a check run plain; with SeLa's rule also the column update
    in front of such a pass; every other half-step takes omega."""
    from selflabel.iterate import Loop

    relax = Relaxation(True)
    relax.omega_now = 1.5
    loop = Loop(None, None, 1e-5, 100, check_every, criterion, None, relax)
    for k in range(1, 40):
        loop.k = k
        check = loop.due()
        assert check == (k % check_every == 0 if criterion == "marginal" else k > 1 and (k - 1) % check_every == 0)
        assert loop.row_omega() == (1.0 if check else 1.5)
        assert loop.col_omega() == (1.0 if criterion == "sela" and loop.due(k + 1) else 1.5)
