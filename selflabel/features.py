"""Implicit mode: solve from features and prototypes without storing the N x K scores.

On CPU (backend "chunked") ``S = X W^T + bias`` is recomputed block by block (a BLAS
matmul per row block) and fed to the chunked backend's fused passes, so memory is
O(N*D + N + K) plus one block, whatever K is; features may themselves be streamed from a
``.npy`` file or memmap. On GPU (backend "triton") the fused kernel of ``kernels/implicit.py``
computes each score tile with ``tl.dot`` inside the log-domain pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .backends import get_backend
from .backends.implicit import FeatureScores
from .result import SinkhornResult
from .solver import sinkhorn_knopp
from .source import make_source


def _check_prototypes(prototypes: Any, bias: Any, d: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Check prototypes (K, D) / (H, K, D) and bias (K,) / (H, K); returns (w (H, K, D), bias (H, K) or None, ndim)."""
    w = torch.as_tensor(prototypes)
    if not w.dtype.is_floating_point:
        raise TypeError(f"prototypes must be floating point, got {w.dtype}")
    ndim = 3 if w.dim() == 3 else 2
    w = w if w.dim() == 3 else w.unsqueeze(0)
    if w.dim() != 3 or w.shape[2] != d:
        raise ValueError(f"prototypes must have shape (K, D) or (H, K, D) with D={d} "
                         f"(the features' width), got {tuple(torch.as_tensor(prototypes).shape)}")
    h, k, _ = w.shape
    if bias is not None:
        b = torch.as_tensor(bias)
        b = b if b.dim() == 2 else b.unsqueeze(0)
        if tuple(b.shape) not in ((h, k), (1, k)):
            raise ValueError(f"bias must have shape ({k},) or ({h}, {k}), got {tuple(torch.as_tensor(bias).shape)}")
        bias = b.expand(h, k)
    return w, bias, ndim


class FeatureSource:
    """Row blocks of ``X W^T + bias`` for H heads: (H, rows, K) in the features' dtype."""

    def __init__(self, features: Any, prototypes: Any, bias: Any = None) -> None:
        if isinstance(features, torch.Tensor) and features.device.type != "cpu":
            raise ValueError("backend='chunked' streams CPU features; CUDA features run on backend='triton' "
                             "(the default 'auto' picks it)")
        self.x = make_source(features)
        if self.x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(self.x.shape)}")
        w, bias, self.ndim = _check_prototypes(prototypes, bias, self.x.shape[2])
        self.dtype = torch.float64 if torch.float64 in (self.x.dtype, w.dtype) else torch.float32
        h, k, _ = w.shape
        self.w_t = w.to(self.dtype).transpose(1, 2).contiguous()  # (H, D, K)
        self.bias = None if bias is None else bias.to(self.dtype)[:, None, :]
        self.shape = (h, self.x.shape[1], k)
        self.itemsize = torch.tensor([], dtype=self.dtype).element_size()
        # per row: the feature reader's two D-wide buffers and the (H, K) block of scores
        self.storage_row_bytes = 2 * self.x.shape[2] * self.x.itemsize + h * k * self.itemsize
        self._out: torch.Tensor | None = None  # the block buffer, kept across passes

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Each block is valid until the next one is drawn: one output buffer serves every
        block of every pass (a fresh allocation per block would page-fault each time)."""
        h, _, k = self.shape
        if self._out is None or self._out.numel() != h * rows * k:
            self._out = torch.empty(h * rows * k, dtype=self.dtype)
        out = self._out
        for lo, hi, xb in self.x.blocks(rows):
            s = torch.matmul(xb[0].to(self.dtype), self.w_t, out=out[: h * (hi - lo) * k].view(h, hi - lo, k))
            if self.bias is not None:
                s += self.bias
            yield lo, hi, s


def sinkhorn_knopp_features(features: Any, prototypes: Any, bias: Any = None, *, memory_budget: int | str | None = None,
                            **options: Any) -> SinkhornResult:
    """Label N samples from features (N, D) and prototypes (K, D) or (H, K, D), with scores
    ``lamb * (X W^T + bias)`` treated as logits and never stored whole.

    Args:
        features: (N, D) tensor, array, memmap or ``.npy`` path (streamed in row blocks).
        prototypes: (K, D), or (H, K, D) for H heads (labels (H, N)).
        bias: (K,) or (H, K), optional.
        memory_budget: bytes or "512MB" for the solver's buffers (default: a quarter of RAM); "chunked" only.
        **options: as for ``sinkhorn_knopp`` (lamb, algorithm, dtype, tol, max_iter, init, ...), and
            ``backend``: "auto" (CUDA tensors -> "triton", else "chunked"), "chunked" (CPU, streamed
            BLAS blocks, features may be a file) or "triton" (fused ``tl.dot`` log-domain kernel;
            float32 features at the precision ``torch.set_float32_matmul_precision`` sets (float32
            products at torch's default "highest", TF32 at "medium"), bfloat16/float16 as they are,
            float64 exactly).
    """
    if "kind" in options and options["kind"] != "logits":
        raise ValueError("sinkhorn_knopp_features scores are logits (X W^T + bias); kind cannot be changed")
    options.pop("kind", None)
    backend = options.pop("backend", "auto")
    on_gpu = isinstance(features, torch.Tensor) and features.device.type == "cuda"
    if backend == "auto":
        backend = "triton" if on_gpu else "chunked"
    if backend == "chunked":
        source = FeatureSource(features, prototypes, bias)
        return sinkhorn_knopp(source, kind="logits", backend="chunked", memory_budget=memory_budget, **options)
    if backend != "triton":
        raise ValueError(f"sinkhorn_knopp_features backend must be 'auto', 'chunked' (CPU, streamed) or 'triton' "
                         f"(fused tl.dot kernel), got {backend!r}")
    if memory_budget is not None:
        raise ValueError("memory_budget applies to backend='chunked'; the triton path keeps only X, W and O(N + K)")
    get_backend("triton", features.device if isinstance(features, torch.Tensor) else torch.device("cpu"))
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError("backend='triton' needs features as an (N, D) tensor on the GPU")
    if not features.dtype.is_floating_point:
        raise TypeError(f"features must be floating point, got {features.dtype}")
    w, b, ndim = _check_prototypes(prototypes, bias, features.shape[1])
    x = features.contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scores = FeatureScores(x, w.to(device=x.device, dtype=x.dtype).contiguous(),
                           None if b is None else b.to(device=x.device, dtype=acc).contiguous(), stacked=ndim == 3)
    return sinkhorn_knopp(scores, kind="logits", **options)
