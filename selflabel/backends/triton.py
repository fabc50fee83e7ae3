"""Triton backend: the GPU path. Every iteration on GPU happens in
``kernels/scaling.py`` (scaling form) or ``kernels/logdomain.py`` (log domain),
installed as ``selflabel.kernels``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (for tests).
"""

from __future__ import annotations

import torch

from . import BackendBase, Prepared
from .torch_ref import TorchBackend, absorb


class TritonBackend(BackendBase):
    name = "triton"
    absorbs = True  # col_pot: the log kernel from the Triton prepare, absorbed with torch ops (rare: on drift)

    def __init__(self) -> None:
        from selflabel.kernels import labels, logdomain, prepare, scaling

        self._prepare, self._scaling, self._log, self._labels = prepare, scaling, logdomain, labels

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool,
                col_pot: torch.Tensor | None = None) -> Prepared:
        if col_pot is None:
            return Prepared(*self._prepare.prepare(scores, lamb, probs, exponentiate))
        mat, rowmax, colmax, rowsum, rowmin = self._prepare.prepare(scores, lamb, probs, False)
        mat, row_pot = absorb(mat, col_pot)
        return Prepared(mat.exp_() if exponentiate else mat, rowmax, colmax, rowsum, rowmin, row_pot)

    def scaling_pass(self, M, a, u, v, omega=1.0):
        return self._scaling.scaling_pass(M, a, u, v, omega)

    def log_pass(self, L, log_a, f, g, omega=1.0):
        return self._log.log_pass(L, log_a, f, g, omega)

    # the drop-ins' output pass: one cuBLAS batched product and two element-wise ops, as in torch
    column_sums = TorchBackend.column_sums
    normalised_rows = TorchBackend.normalised_rows

    def labels(self, mat, log_v, linear, row_offset=0):
        return self._labels.labels(mat, log_v, linear, row_offset)
