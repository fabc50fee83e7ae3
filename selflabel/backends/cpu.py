"""Fused C++ CPU backend: thin wrappers over selflabel._C (csrc/sinkhorn.cpp)."""

from __future__ import annotations

import torch

from . import Prepared


def _ext():
    try:
        from selflabel import _C
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError(
            "selflabel._C is not built; install from source with "
            "`pip install --no-build-isolation -e .` or use backend='torch'"
        ) from exc
    return _C


class CpuBackend:
    name = "cpu"

    def __init__(self) -> None:
        self._C = _ext()

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        return Prepared(*self._C.prepare(scores, float(lamb), probs, exponentiate))

    def scaling_pass(self, M, a, u, v):
        w, change = self._C.scaling_pass(M, a, u, v)
        return w, change

    def log_pass(self, L, log_a, f, g):
        logw, change = self._C.log_pass(L, log_a, f, g)
        return logw, change

    def labels(self, mat, log_v, linear):
        return self._C.labels(mat, log_v.contiguous(), linear)
