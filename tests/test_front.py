"""Solver front: auto/fallback policy, heads, warm starts, input types, criteria, plan."""

import numpy as np
import pytest
import torch
from reference import log_sinkhorn

import selflabel as sl
import selflabel.iterate as iterate_mod
from selflabel.synthetic import make_scores


def _peaked(n=400, k=20, dead=2, dtype=torch.float32, seed=0):
    return make_scores(n, k, temperature=12.0, dead=dead, dead_margin=1.5, dtype=dtype, seed=seed)


@pytest.mark.parametrize("algorithm", ["auto", "scaling"])
def test_float32_at_lamb_100_with_dead_clusters(algorithm):
    """The stabilised scaling form (potentials absorbed into the kernel) solves what the plain one cannot."""
    scores = _peaked()
    n, k = scores.shape
    with pytest.raises(FloatingPointError, match="algorithm='log'"):  # no absorption in chunked mode
        sl.sinkhorn_knopp(scores, lamb=100.0, algorithm="scaling", backend="chunked")
    res = sl.sinkhorn_knopp(scores, lamb=100.0, max_iter=20_000, algorithm=algorithm)
    assert res.algorithm == "scaling" and res.switched_at is None
    assert res.converged and res.error <= 1e-5
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all()
    sizes = torch.bincount(res.labels, minlength=k)
    assert sizes.min() >= 0.8 * n / k and sizes.max() <= 1.2 * n / k
    q_ref, _ = log_sinkhorn(100.0 * scores.double().numpy(), tol=1e-6)
    assert np.abs(res.plan().double().numpy() - q_ref).sum() <= 1e-4
    assert (res.labels.numpy() == q_ref.argmax(1)).mean() >= 0.99


def test_auto_switches_to_log_when_scaling_breaks(monkeypatch):
    scores = _peaked()
    # Pretend the dtype's range is huge so auto starts with the scaling form and must recover at run time
    # (in chunked mode, which does not absorb potentials into its kernel).
    monkeypatch.setitem(iterate_mod.SCALING_SAFE_LOG, torch.float32, 1e9)
    res = sl.sinkhorn_knopp(scores, lamb=100.0, max_iter=20_000, backend="chunked")
    assert res.switched_at is not None and res.algorithm == "log"
    assert res.converged and torch.isfinite(res.log_v).all()
    direct = sl.sinkhorn_knopp(scores, lamb=100.0, algorithm="log", max_iter=20_000)
    assert (res.labels == direct.labels).float().mean() >= 0.999


def test_auto_fallback_at_the_last_iteration_still_runs_max_iter(monkeypatch):
    scores = _peaked()
    monkeypatch.setitem(iterate_mod.SCALING_SAFE_LOG, torch.float32, 1e9)
    res = sl.sinkhorn_knopp(scores, lamb=100.0, tol=0, max_iter=3, check_every=10, backend="chunked")
    assert res.switched_at == 0 and res.algorithm == "log" and res.n_iter == 3
    direct = sl.sinkhorn_knopp(scores, lamb=100.0, algorithm="log", tol=0, max_iter=3)
    assert torch.allclose(res.log_v, direct.log_v) and torch.allclose(res.log_u, direct.log_u)


def test_auto_takes_scaling_when_safe():
    res = sl.sinkhorn_knopp(make_scores(500, 20, temperature=2.0), lamb=5.0)
    assert res.algorithm == "scaling" and res.switched_at is None and res.converged


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_heads_equal_separate_solves(backend):
    stacked = make_scores(300, 11, heads=3, temperature=3.0, dtype=torch.float64, seed=5)
    res = sl.sinkhorn_knopp(stacked, backend=backend, tol=1e-10, max_iter=50_000)
    assert res.labels.shape == (3, 300) and res.log_v.shape == (3, 11) and res.log_u.shape == (3, 300)
    as_list = sl.sinkhorn_knopp(list(stacked), backend=backend, tol=1e-10, max_iter=50_000)
    assert torch.equal(as_list.labels, res.labels)
    for h in range(3):
        single = sl.sinkhorn_knopp(stacked[h], backend=backend, tol=1e-10, max_iter=50_000)
        assert torch.equal(single.labels, res.labels[h])
        q_single, q_heads = single.plan(), res.plan()[h]
        assert (q_single - q_heads).abs().sum() <= 1e-9


def test_warm_start_cuts_iterations():
    scores = make_scores(3000, 50, temperature=5.0, seed=1)
    cold = sl.sinkhorn_knopp(scores, lamb=25.0)
    again = sl.sinkhorn_knopp(scores, lamb=25.0, init=cold)
    assert again.n_iter <= 10 and again.converged
    drifted = scores + 0.05 * torch.randn_like(scores)  # the network moved a little between labellings
    warm = sl.sinkhorn_knopp(drifted, lamb=25.0, init=cold.log_v)
    fresh = sl.sinkhorn_knopp(drifted, lamb=25.0)
    assert warm.converged and warm.n_iter < fresh.n_iter
    assert (warm.labels == fresh.labels).float().mean() >= 0.999


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_warm_start_with_potentials_beyond_exp_range(backend):
    """A warm start whose exp underflows: absorbed into the kernel by the stabilised scaling form
    (cpu), or the log form from the given potentials (chunked; it once resumed from log(0) = -inf
    and raised)."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.log_softmax(20 * torch.randn(2, 400, 10, generator=gen, dtype=torch.float64), -1)
    init = torch.tensor([-900.0] * 5 + [0.0] * 5, dtype=torch.float64)  # exp(-900) == 0 in float64
    res = sl.sinkhorn_knopp(scores, kind="log_probs", lamb=50.0, init=init, backend=backend, max_iter=20_000)
    ref = sl.sinkhorn_knopp(scores, kind="log_probs", lamb=50.0, algorithm="log", backend=backend, max_iter=20_000)
    assert res.algorithm == ("log" if backend == "chunked" else "scaling")
    assert torch.isfinite(res.log_v).all() and res.converged == ref.converged
    assert (res.labels == ref.labels).float().mean() >= 0.99


def test_input_types_give_the_same_result(tmp_path):
    scores = make_scores(200, 9, seed=2)
    base = sl.sinkhorn_knopp(scores)
    arr = scores.numpy()
    path = tmp_path / "s.npy"
    np.save(path, arr)
    mm = np.load(path, mmap_mode="r")
    for src in (arr, mm, str(path), path):
        assert torch.equal(sl.sinkhorn_knopp(src).labels, base.labels)


def test_non_contiguous_and_sliced_input():
    big = make_scores(400, 30, dtype=torch.float64, seed=4)
    sliced = big[::2, 3:20]
    transposed = big[:, :17].T.contiguous().T  # same values, column-major strides
    ref = sl.sinkhorn_knopp(sliced.contiguous(), tol=1e-10)
    assert torch.equal(sl.sinkhorn_knopp(sliced, tol=1e-10).labels, ref.labels)
    ref2 = sl.sinkhorn_knopp(big[:, :17].contiguous(), tol=1e-10)
    assert torch.equal(sl.sinkhorn_knopp(transposed, tol=1e-10).labels, ref2.labels)


def test_half_precision_input_is_computed_in_float32():
    scores = make_scores(300, 10, seed=6)
    res = sl.sinkhorn_knopp(scores.to(torch.bfloat16))
    assert res.log_v.dtype == torch.float32 and res.converged


def test_tol_zero_runs_exactly_max_iter():
    res = sl.sinkhorn_knopp(make_scores(100, 5), tol=0, max_iter=37, check_every=10)
    assert res.n_iter == 37 and not res.converged
    assert [k for k, _ in res.history] == [10, 20, 30, 37]


def test_sela_criterion():
    scores = make_scores(1000, 20, kind="probs", temperature=4.0, dtype=torch.float64)
    res = sl.sinkhorn_knopp(scores, kind="probs", criterion="sela", tol=0.1)
    its = [k for k, _ in res.history]
    assert its[0] == 11 and all((k - 1) % 10 == 0 for k in its)
    assert res.converged and res.history[-1][1] <= 0.1 and all(v > 0.1 for _, v in res.history[:-1])
    # The SeLa rule is a loose stop: the marginal error is still reported for the returned plan.
    assert res.error > 0 and res.n_iter == its[-1]


def test_plan_rows_and_normalisation():
    scores = make_scores(120, 6, dtype=torch.float64, seed=9)
    res = sl.sinkhorn_knopp(scores, tol=1e-10)
    q = res.plan()
    assert torch.allclose(q.sum(1), torch.full((120,), 1 / 120, dtype=torch.float64))
    part = res.plan(slice(10, 20), normalize_rows=True)
    assert part.shape == (10, 6) and torch.allclose(part.sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(part, q[10:20] / q[10:20].sum(1, keepdim=True))
    assert torch.equal(q.argmax(1), res.labels)


def test_k_equal_one_and_single_row():
    res = sl.sinkhorn_knopp(torch.randn(5, 1))
    assert res.labels.tolist() == [0] * 5 and res.converged
    with pytest.warns(UserWarning, match="cannot be balanced"):
        res = sl.sinkhorn_knopp(torch.randn(1, 4))
    assert res.labels.shape == (1,) and torch.isfinite(res.log_v).all()


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_one_progress_bar_per_solve(capsys, backend):
    """One bar counting iterations with the last error (no total pretending the run goes to max_iter);
    chunked mode advances the same bar block by block instead of opening a bar per pass."""
    res = sl.sinkhorn_knopp(make_scores(2000, 5), progress=True, backend=backend,
                            memory_budget=sl.backends.chunked.FIXED_OVERHEAD + 2**20 if backend == "chunked" else None)
    assert res.converged
    err = capsys.readouterr().err
    assert f"sinkhorn[{backend}]" in err and "err=" in err
    assert "/1000" not in err and "pass" not in err
