"""Every bad input raises the documented exception, naming the argument."""

import numpy as np
import pytest
import torch

import selflabel as sl


def good(n=20, k=4):
    return torch.randn(n, k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["cpu", "torch", "chunked"])
def test_nan_and_plus_inf_scores(bad, backend):
    s = good()
    s[3, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf \(row 3"):
        sl.sinkhorn_knopp(s, backend=backend)


def test_non_finite_in_second_head():
    s = torch.randn(2, 10, 3)
    s[1, 7, 0] = float("nan")
    with pytest.raises(ValueError, match="row 7, head 1"):
        sl.sinkhorn_knopp(s)


def test_negative_probabilities():
    p = torch.softmax(good(), 1)
    p[2, 1] = -0.1
    with pytest.raises(ValueError, match="non-negative"):
        sl.sinkhorn_knopp(p, kind="probs")


def test_unnormalised_probabilities():
    p = torch.softmax(good(), 1) * 1.5
    with pytest.raises(ValueError, match="summing to 1"):
        sl.sinkhorn_knopp(p, kind="probs")


def test_zero_probability_column_is_infeasible():
    p = torch.softmax(good(), 1)
    p[:, 2] = 0
    p /= p.sum(1, keepdim=True)
    with pytest.raises(ValueError, match="cluster 2"):
        sl.sinkhorn_knopp(p, kind="probs")


def test_zero_probabilities_elsewhere_are_fine():
    p = torch.softmax(good(40, 4), 1).double()
    p[0, 1] = 0
    p /= p.sum(1, keepdim=True)
    res = sl.sinkhorn_knopp(p, kind="probs")
    assert res.converged and res.labels[0] != 1


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_bad_ndim(shape):
    with pytest.raises(ValueError, match=r"\(N, K\) or \(H, N, K\)"):
        sl.sinkhorn_knopp(torch.randn(shape))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 3, 3)])
def test_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        sl.sinkhorn_knopp(torch.randn(shape))


def test_integer_scores():
    with pytest.raises(TypeError, match="floating point"):
        sl.sinkhorn_knopp(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating point"):
        sl.sinkhorn_knopp(np.ones((4, 2), dtype=np.int32))


def test_unsupported_type():
    with pytest.raises(TypeError, match="scores must be"):
        sl.sinkhorn_knopp({"a": 1})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        sl.sinkhorn_knopp(tmp_path / "nope.npy")


def test_ragged_list_of_heads():
    with pytest.raises(ValueError, match="one shape"):
        sl.sinkhorn_knopp([torch.randn(4, 2), torch.randn(5, 2)])


@pytest.mark.parametrize("lamb", [0, -1.0, float("nan"), float("inf"), "25", True])
def test_bad_lamb(lamb):
    with pytest.raises(ValueError, match="lamb"):
        sl.sinkhorn_knopp(good(), lamb=lamb)


@pytest.mark.parametrize("name", ["row_marginal", "col_marginal"])
def test_marginal_wrong_length(name):
    with pytest.raises(ValueError, match=name + r" must have shape"):
        sl.sinkhorn_knopp(good(), **{name: np.ones(7) / 7})


@pytest.mark.parametrize("name,n", [("row_marginal", 20), ("col_marginal", 4)])
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan")])
def test_marginal_bad_entries(name, n, bad):
    m = np.ones(n) / n
    m[1] = bad
    with pytest.raises(ValueError, match=name):
        sl.sinkhorn_knopp(good(), **{name: m})


def test_marginal_not_summing_to_one_is_normalised_with_warning():
    s = good().double()
    b = np.array([1.0, 2.0, 3.0, 4.0])
    with pytest.warns(UserWarning, match="col_marginal sums to 10"):
        res = sl.sinkhorn_knopp(s, col_marginal=b, tol=1e-10)
    ref = sl.sinkhorn_knopp(s, col_marginal=b / 10, tol=1e-10)
    assert torch.equal(res.labels, ref.labels)
    assert torch.allclose(res.plan().sum(0), torch.tensor(b / 10), atol=1e-9)


def test_fewer_samples_than_clusters_warns():
    with pytest.warns(UserWarning, match="N=3 samples < K=5"):
        sl.sinkhorn_knopp(torch.randn(3, 5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="softmax"), "kind"), (dict(algorithm="fast"), "algorithm"), (dict(criterion="l2"), "criterion"),
    (dict(backend="gpu"), "backend"), (dict(dtype=torch.float16), "dtype"), (dict(tol=-1.0), "tol"),
    (dict(max_iter=0), "max_iter"), (dict(check_every=0), "check_every"), (dict(init=torch.zeros(3)), "init"),
    (dict(init=torch.full((4,), float("nan"))), "init"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sl.sinkhorn_knopp(good(), **kwargs)


def test_unknown_backend_lists_every_choice():
    with pytest.raises(ValueError, match="'chunked'") as err:
        sl.sinkhorn_knopp(torch.rand(8, 3), backend="chunk")
    assert "backend='chunk'" in str(err.value) and "'triton'" in str(err.value)
