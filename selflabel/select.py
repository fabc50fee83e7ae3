"""Which backend runs a solve: the one table of backends, and the scores as the solver runs them.

``select`` turns what ``sinkhorn_knopp`` was given into scores a backend reads, checks them once,
and picks that backend:

=================================  ==============================================================
scores                             backend
=================================  ==============================================================
``Features`` (features, W, bias)   "triton" (fused ``tl.dot`` kernel) for CUDA features, or CPU
                                   features with ``device="cuda"`` and no budget; else "chunked"
                                   over ``FeatureBlocks`` (a BLAS matmul per row block)
any, with ``memory_budget`` or     "chunked": row blocks streamed from a file, array, tensor or
``backend="chunked"``              function to ``for_blocks(device)`` within the budget
tensor, array, ``.npy``, heads     ``in_memory(backend, device)``: "cpu" (fused C++), "triton"
                                   (fused Triton kernels) or "torch" (plain torch ops)
=================================  ==============================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .backends import Backend, resolve_device
from .backends.chunked import ChunkedBackend, ChunkedScores, cap_block_rows, rows_for_budget
from .backends.implicit import ImplicitTritonBackend
from .features import FeatureBlocks, Features, implicit_scores
from .source import make_source
from .validate import as_tensor, budget_bytes, compute_dtype

BACKENDS = ("auto", "cpu", "torch", "triton", "chunked")  # what sinkhorn_knopp's backend= accepts
FEATURE_BACKENDS = ("auto", "chunked", "triton")  # what sinkhorn_knopp_features' backend= accepts


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def in_memory(name: str, device: torch.device) -> Backend:
    """The backend for scores held whole on ``device``: "auto" is "cpu" on CPU, "triton" on CUDA
    (plain "torch" where triton is missing)."""
    from .backends.cpu import CpuBackend
    from .backends.torch_ref import TorchBackend

    if name == "auto":
        if device.type == "cpu":
            name = "cpu"
        else:
            name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU scores, got scores on {device}; use backend='auto'")
        return CpuBackend()
    if name == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise ValueError(f"backend='triton' needs CUDA scores, got scores on {device} "
                             "(set TRITON_INTERPRET=1 to run the kernels on CPU for testing)")
        from .backends.triton import TritonBackend

        return TritonBackend()
    raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, BACKENDS))}")


def for_blocks(device: torch.device, reader_thread: bool = False) -> Backend:
    """The backend that runs the chunked passes over each row block: fused C++ on CPU, Triton
    on CUDA (plain torch where triton is missing). ``reader_thread``: the source reads the next
    block on a thread of its own; on CPU that thread keeps a core to itself (a warm-cache pass
    is bound by that copy, and a compute thread sharing its core slows it down)."""
    if device.type == "cpu":
        from .backends.cpu import CpuBackend

        return CpuBackend(threads=max(1, torch.get_num_threads() - 1) if reader_thread else 0)
    return in_memory("auto", device)


@dataclass
class Selected:
    """The scores as the solver runs them: ``scores`` (dense (H, N, K) tensor in ``cdtype``, streamed or
    implicit scores), the ``backend`` that runs them, and what the result reports."""

    scores: Any
    backend: Backend
    shape: tuple[int, int, int]
    stacked: bool  # given as (H, N, K): labels come back (H, N)
    device: torch.device
    storage: torch.dtype  # the dtype the scores were given in
    cdtype: torch.dtype  # the compute dtype
    raw3: torch.Tensor | None = None  # in-memory scores as given, (H, N, K), kept by the result for plan()
    algorithm: str = "scaling"  # the form the solve starts in: "scaling", or "log"


def select(scores: Any, *, backend: str = "auto", algorithm: str = "auto", device: Any = None, dtype: Any = None,
           memory_budget: Any = None) -> Selected:
    """Check the scores and the backend, device, dtype and budget asked for, and pick the backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if isinstance(scores, Features):
        sel = _features(scores, backend, device, dtype, memory_budget)
    elif backend == "chunked" or (backend == "auto" and memory_budget is not None):
        sel = _chunked(scores, device, dtype, memory_budget)
    else:
        if memory_budget is not None:
            raise ValueError(f"memory_budget applies to backend='chunked' (or 'auto'), not backend={backend!r}")
        sel = _dense(scores, backend, device, dtype)
    if sel.backend.log_only:
        if algorithm == "scaling":
            raise ValueError(f"backend {sel.backend.name!r} runs the log domain only; use algorithm='log' or 'auto'")
        sel.algorithm = "log"
    elif algorithm == "log":
        sel.algorithm = "log"
    return sel


def _nonempty(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if 0 in tuple(shape):
        raise ValueError(f"scores must not be empty, got shape {tuple(shape)}")
    return tuple(shape)


def _dense(scores: Any, backend: str, device: Any, dtype: Any) -> Selected:
    raw = as_tensor(scores)
    if device is not None:
        raw = raw.to(resolve_device(device, raw.device))
    if raw.dim() not in (2, 3):
        raise ValueError(f"scores must have shape (N, K) or (H, N, K), got {tuple(raw.shape)}")
    raw3 = raw if raw.dim() == 3 else raw.unsqueeze(0)
    shape, cdtype = _nonempty(raw3.shape), compute_dtype(dtype, raw3)
    return Selected(raw3.to(cdtype).contiguous(), in_memory(backend, raw3.device), shape, raw.dim() == 3,
                    raw3.device, raw3.dtype, cdtype, raw3)


def _chunked(scores: Any, device: Any, dtype: Any, memory_budget: Any) -> Selected:
    src = make_source(scores)
    device = resolve_device(device, scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu"))
    cdtype = compute_dtype(dtype, torch.empty(0, dtype=src.dtype))
    shape = _nonempty(src.shape)
    rows = cap_block_rows(rows_for_budget(src, cdtype, budget_bytes(memory_budget, device)), shape, src.itemsize,
                          device)
    be = ChunkedBackend(rows, device, for_blocks(device, reader_thread=src.reader_thread))
    return Selected(ChunkedScores(src, cdtype), be, shape, src.ndim == 3, device, src.dtype, cdtype)


def _features(spec: Features, backend: str, device: Any, dtype: Any, memory_budget: Any) -> Selected:
    x = spec.features
    here = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")  # a path or array: on the host
    there = resolve_device(device, here)
    if backend == "auto":
        backend = "triton" if here.type == "cuda" or (there.type == "cuda" and memory_budget is None) else "chunked"
    if backend == "chunked":
        return _chunked(FeatureBlocks(x, spec.prototypes, spec.bias), device, dtype, memory_budget)
    if backend != "triton":
        raise ValueError(f"sinkhorn_knopp_features backend must be one of {', '.join(map(repr, FEATURE_BACKENDS))} "
                         f"('chunked': CPU, streamed; 'triton': fused tl.dot kernel), got {backend!r}")
    if memory_budget is not None:
        raise ValueError("memory_budget applies to backend='chunked'; the triton path keeps only X, W and O(N + K)")
    if device is not None:  # the kernel runs where the features are: move them (a path or array is loaded)
        x = as_tensor(x, "features").to(there)
    in_memory("triton", there)
    scores = implicit_scores(x, spec.prototypes, spec.bias)
    native = torch.float64 if scores.x.dtype == torch.float64 else torch.float32
    cdtype = native if native == torch.float64 else compute_dtype(dtype, scores.w)
    if cdtype != native:
        raise ValueError("implicit mode computes in the features' precision: pass float64 features for dtype=float64")
    return Selected(scores, ImplicitTritonBackend(), _nonempty(scores.shape), scores.stacked, scores.device,
                    scores.x.dtype, cdtype, algorithm="log")
