"""``selflabel.select``: the one table that decides which backend runs which scores."""

import numpy as np
import pytest
import torch
from conftest import ON_GPU

import selflabel as sl
from selflabel.backends.cpu import CpuBackend
from selflabel.features import Features
from selflabel.select import BACKENDS, FEATURE_BACKENDS, select


def test_unknown_backends_are_refused_with_every_choice():
    for bad in ("nope", "CPU", "triton-implicit"):
        with pytest.raises(ValueError) as info:
            sl.sinkhorn_knopp(torch.randn(6, 3), backend=bad)
        assert all(repr(name) in str(info.value) for name in BACKENDS)
        with pytest.raises(ValueError) as info:
            sl.sinkhorn_knopp_features(torch.randn(6, 4), torch.randn(3, 4), backend=bad)
        assert all(repr(name) in str(info.value) for name in FEATURE_BACKENDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_table(tmp_path, dtype):
    x = torch.randn(2, 30, 5, dtype=dtype)
    np.save(tmp_path / "s.npy", x.numpy())
    cases = [  # (scores, options, backend picked, shape, stacked, algorithm it starts in)
        (x[0], {}, "cpu", (1, 30, 5), False, "scaling"),
        (x, {"backend": "torch", "algorithm": "log"}, "torch", (2, 30, 5), True, "log"),
        (x.numpy(), {"memory_budget": "80MB"}, "chunked", (2, 30, 5), True, "scaling"),
        (str(tmp_path / "s.npy"), {"backend": "chunked"}, "chunked", (2, 30, 5), True, "scaling"),
        (Features(x[0], torch.randn(3, 5, 5, dtype=dtype)), {}, "chunked", (3, 30, 5), True, "scaling"),
        (Features(x[0].numpy(), torch.randn(5, 5, dtype=dtype)), {"backend": "chunked"}, "chunked", (1, 30, 5),
         False, "scaling"),
    ]
    for scores, options, name, shape, stacked, algorithm in cases:
        sel = select(scores, **options)
        assert (sel.backend.name, sel.shape, sel.stacked, sel.algorithm) == (name, shape, stacked, algorithm)
        assert sel.cdtype == dtype and sel.device == torch.device("cpu")
    # a file is read ahead by a thread of its own, which keeps a core to itself
    inner = select(str(tmp_path / "s.npy"), backend="chunked").backend.inner
    assert isinstance(inner, CpuBackend) and inner.threads == max(1, torch.get_num_threads() - 1)
    assert select(x, backend="chunked").backend.inner.threads == 0


def test_options_that_do_not_fit_the_backend_are_refused():
    x = torch.randn(30, 5)
    with pytest.raises(ValueError, match="memory_budget applies to backend='chunked'"):
        select(x, backend="cpu", memory_budget="1GB")
    with pytest.raises(ValueError, match="must not be empty"):
        select(torch.randn(0, 5))
    with pytest.raises(ValueError, match="must not be empty"):
        select(torch.randn(4, 0).numpy(), backend="chunked", memory_budget="80MB")
    with pytest.raises(ValueError, match="sinkhorn_knopp_features backend must be one of"):
        select(Features(x, torch.randn(3, 5)), backend="cpu")


def test_features_with_device_cuda_go_to_the_gpu_kernel():
    """device="cuda" without a budget runs the fused kernel on the GPU (a clear error without one);
    with a budget the score blocks are computed on CPU and streamed."""
    x, w = torch.randn(40, 8), torch.randn(5, 8)
    if not ON_GPU:
        with pytest.raises(ValueError, match="CUDA is not available"):
            select(Features(x, w), device="cuda")
        return
    assert select(Features(x, w), device="cuda").backend.name == "triton-implicit"
    sel = select(Features(x, w), device="cuda", memory_budget="100MB")
    assert sel.backend.name == "chunked" and sel.device.type == "cuda"
