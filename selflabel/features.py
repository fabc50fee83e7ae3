"""Implicit mode: solve from features and prototypes without storing the N x K scores.

``S = X W^T + bias`` is recomputed block by block (a BLAS matmul per row block) and fed
to the chunked backend's fused passes, so memory is O(N*D + N + K) plus one block, whatever
K is. Features may themselves be streamed from a ``.npy`` file or memmap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .result import SinkhornResult
from .solver import sinkhorn_knopp
from .source import make_source


class FeatureSource:
    """Row blocks of ``X W^T + bias`` for H heads: (H, rows, K) in the features' dtype."""

    def __init__(self, features: Any, prototypes: Any, bias: Any = None) -> None:
        if isinstance(features, torch.Tensor) and features.device.type != "cpu":
            raise ValueError("sinkhorn_knopp_features runs on CPU tensors for now (the fused GPU kernel is not "
                             "written yet); pass features.cpu(), or sinkhorn_knopp(X @ W.T + b) on the GPU")
        self.x = make_source(features)
        if self.x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(self.x.shape)}")
        w = torch.as_tensor(prototypes)
        if not w.dtype.is_floating_point:
            raise TypeError(f"prototypes must be floating point, got {w.dtype}")
        self.ndim = 3 if w.dim() == 3 else 2
        w = w if w.dim() == 3 else w.unsqueeze(0)
        if w.dim() != 3 or w.shape[2] != self.x.shape[2]:
            raise ValueError(f"prototypes must have shape (K, D) or (H, K, D) with D={self.x.shape[2]} "
                             f"(the features' width), got {tuple(torch.as_tensor(prototypes).shape)}")
        h, k, _ = w.shape
        if bias is not None:
            b = torch.as_tensor(bias)
            b = b if b.dim() == 2 else b.unsqueeze(0)
            if tuple(b.shape) not in ((h, k), (1, k)):
                raise ValueError(f"bias must have shape ({k},) or ({h}, {k}), got {tuple(torch.as_tensor(bias).shape)}")
            bias = b
        self.dtype = torch.float64 if torch.float64 in (self.x.dtype, w.dtype) else torch.float32
        self.w_t = w.to(self.dtype).transpose(1, 2).contiguous()  # (H, D, K)
        self.bias = None if bias is None else bias.to(self.dtype)[:, None, :]
        self.shape = (h, self.x.shape[1], k)
        self.itemsize = torch.tensor([], dtype=self.dtype).element_size()
        # per row: the feature reader's two D-wide buffers and the (H, K) block of scores
        self.storage_row_bytes = 2 * self.x.shape[2] * self.x.itemsize + h * k * self.itemsize

    def blocks(self, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for lo, hi, xb in self.x.blocks(rows):
            s = torch.matmul(xb[0].to(self.dtype), self.w_t)  # (H, rows, K)
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
        memory_budget: bytes or "512MB" for the solver's buffers (default: a quarter of RAM).
        **options: as for ``sinkhorn_knopp`` (lamb, algorithm, dtype, tol, max_iter, init, ...).
    """
    if "kind" in options and options["kind"] != "logits":
        raise ValueError("sinkhorn_knopp_features scores are logits (X W^T + bias); kind cannot be changed")
    if options.get("backend", "chunked") != "chunked":
        raise ValueError("sinkhorn_knopp_features streams its scores: backend must be 'chunked' (the default)")
    options.pop("backend", None)
    options.pop("kind", None)
    source = FeatureSource(features, prototypes, bias)
    return sinkhorn_knopp(source, kind="logits", backend="chunked", memory_budget=memory_budget, **options)
