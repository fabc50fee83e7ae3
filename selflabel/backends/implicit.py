"""Implicit Triton backend: scores ``X W^T + bias`` recomputed tile by tile on the GPU, never stored.

The iteration happens in ``kernels/implicit.py`` (one fused launch per head and iteration).
The row maxima (prepare) and the labels (final pass) stream row blocks through cuBLAS,
each block at most ``block_bytes``. Log domain only. Runs on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import BackendBase, Prepared
from .torch_ref import argmax_round


@dataclass
class ImplicitScores:
    """The implicit (H, N, K) score matrix of features x (N, D), prototypes w (H, K, D), bias (H, K) or None."""

    x: torch.Tensor
    w: torch.Tensor
    bias: torch.Tensor | None
    stacked: bool = True  # prototypes were given as (H, K, D): labels come back (H, N)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.w.shape[0], self.x.shape[0], self.w.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def row_blocks(self, dtype: torch.dtype, block_bytes: int):
        """Yield (lo, hi, S) with S the (H, rows, K) scores of rows lo:hi in ``dtype``."""
        h, n, k = self.shape
        rows = max(1, block_bytes // (h * k * torch.tensor([], dtype=dtype).element_size()))
        w_t = self.w.to(dtype).transpose(1, 2)
        for lo in range(0, n, rows):
            s = torch.matmul(self.x[lo:lo + rows].to(dtype), w_t)
            if self.bias is not None:
                s += self.bias.to(dtype)[:, None, :]
            yield lo, min(lo + rows, n), s


@dataclass
class _Implicit:
    scores: ImplicitScores
    lamb: float
    rowmax: torch.Tensor  # (H, N)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.scores.shape


class ImplicitTritonBackend(BackendBase):
    name = "triton-implicit"
    log_only = True

    def __init__(self, block_bytes: int = 64 * 2**20) -> None:
        from selflabel.kernels import implicit

        self._kernel, self.block_bytes = implicit, block_bytes

    def prepare(self, scores: ImplicitScores, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        h, n, k = scores.shape
        dtype = torch.float64 if scores.x.dtype == torch.float64 else torch.float32
        rowmax = torch.empty(h, n, dtype=dtype, device=scores.device)
        colmax = torch.full((h, k), float("-inf"), dtype=dtype, device=scores.device)
        for lo, hi, s in scores.row_blocks(dtype, self.block_bytes):
            m = s.amax(-1)
            rowmax[:, lo:hi] = m
            torch.maximum(colmax, (lamb * (s - m[..., None])).amax(1), out=colmax)
        zeros = torch.zeros(h, n, dtype=torch.float64, device=scores.device)
        return Prepared(_Implicit(scores, lamb, rowmax), rowmax, colmax, zeros, zeros)

    def scaling_pass(self, M, a, u, v, omega=1.0):
        raise NotImplementedError("the implicit backend runs the log domain only")

    def log_pass(self, mat: _Implicit, log_a, f, g, omega=1.0):
        src = mat.scores
        out = [self._kernel.implicit_log_pass(src.x, src.w[h], None if src.bias is None else src.bias[h], mat.lamb,
                                              mat.rowmax[h], log_a, f[h], g[h].contiguous(), omega)
               for h in range(src.shape[0])]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def labels(self, mat: _Implicit, log_v, linear, row_offset=0):
        h, n, _ = mat.shape
        out = torch.empty(h, n, dtype=torch.long, device=mat.scores.device)
        for lo, hi, s in mat.scores.row_blocks(mat.rowmax.dtype, self.block_bytes):
            out[:, lo:hi] = argmax_round(mat.lamb * (s - mat.rowmax[:, lo:hi, None]) + log_v[:, None, :],
                                         row_offset + lo)
        return out
