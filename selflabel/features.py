"""Implicit mode: scores given as features and prototypes, ``S = X W^T + bias``, never stored whole.

``Features`` is what ``sinkhorn_knopp_features`` passes to the solver front; ``selflabel.select``
turns it into one of two score forms:

- ``FeatureBlocks`` (backend "chunked", CPU BLAS): S recomputed block by block (a matmul per row
  block) and fed to the chunked backend's fused passes, so memory is O(N*D + N + K) plus one
  block, whatever K is; features may themselves be streamed from a ``.npy`` file or memmap.
- ``implicit_scores`` (backend "triton", CUDA): the fused kernel of ``kernels/implicit.py``
  computes each score tile with ``tl.dot`` inside the log-domain pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .backends.implicit import ImplicitScores
from .source import RowSource, make_source


@dataclass(frozen=True)
class Features:
    """Scores as features (N, D) and prototypes (K, D) / (H, K, D) with an optional bias (K,) /
    (H, K), as given to ``sinkhorn_knopp_features`` (checked by ``selflabel.select``)."""

    features: Any
    prototypes: Any
    bias: Any = None


def check_prototypes(prototypes: Any, bias: Any, d: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
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


class FeatureBlocks(RowSource):
    """Row blocks of ``X W^T + bias`` for H heads: (H, rows, K) in the features' dtype."""

    def __init__(self, features: Any, prototypes: Any, bias: Any = None) -> None:
        if isinstance(features, torch.Tensor) and features.device.type != "cpu":
            raise ValueError("backend='chunked' streams CPU features; CUDA features run on backend='triton' "
                             "(the default 'auto' picks it)")
        self.x = make_source(features)
        if self.x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(self.x.shape)}")
        w, bias, self.ndim = check_prototypes(prototypes, bias, self.x.shape[2])
        self.dtype = torch.float64 if torch.float64 in (self.x.dtype, w.dtype) else torch.float32
        h, k, _ = w.shape
        self.w_t = w.to(self.dtype).transpose(1, 2).contiguous()  # (H, D, K)
        self.bias = None if bias is None else bias.to(self.dtype)[:, None, :]
        self.shape = (h, self.x.shape[1], k)
        self.itemsize = torch.tensor([], dtype=self.dtype).element_size()
        self._out: torch.Tensor | None = None  # the block buffer, kept across passes

    @property
    def storage_row_bytes(self) -> int:
        """Per row: the feature reader's two D-wide buffers and the (H, K) block of scores."""
        h, _, k = self.shape
        return 2 * self.x.shape[2] * self.x.itemsize + h * k * self.itemsize

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


def implicit_scores(features: Any, prototypes: Any, bias: Any) -> ImplicitScores:
    """The checked (H, N, K) implicit scores of CUDA features for the fused Triton kernel."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError("backend='triton' needs features as an (N, D) tensor on the GPU")
    if not features.dtype.is_floating_point:
        raise TypeError(f"features must be floating point, got {features.dtype}")
    w, b, ndim = check_prototypes(prototypes, bias, features.shape[1])
    x = features.contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ImplicitScores(x, w.to(device=x.device, dtype=x.dtype).contiguous(),
                          None if b is None else b.to(device=x.device, dtype=acc).contiguous(), stacked=ndim == 3)
