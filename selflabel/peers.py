"""Peer Sinkhorn implementations, written from their published algorithms, for
side-by-side benchmarks. Each runs exactly ``n_iter`` iterations and returns
hard labels, so timings of two lengths can be differenced.

- ``sela_numpy``: SeLa's CPU loop: ``r = 1/K / (P^lamb c)``, ``c = 1/N / (r^T P^lamb)``
  on the K x N float64 matrix of probabilities raised to lamb.
- ``torch_matvec``: SeLa's GPU-style loop in torch: two matrix-vector products
  per iteration on the exponentiated matrix.
- ``swav_inplace``: SwAV / DINOv2 style: ``Q = exp(scores / eps)^T``, normalised by
  its total, then rows and columns divided in place each iteration.
- ``pot_sinkhorn``: POT's ``ot.sinkhorn`` with cost ``-S`` and ``reg = 1/lamb``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def sela_numpy(probs: np.ndarray, lamb: float, n_iter: int) -> np.ndarray:
    n, k = probs.shape
    ps = np.ascontiguousarray(probs.T, dtype=np.float64)  # K x N, as SeLa holds it
    ps **= lamb  # in place, as SeLa does
    r = np.ones((k, 1)) / k
    c = np.ones((n, 1)) / n
    inv_k, inv_n = 1.0 / k, 1.0 / n
    for _ in range(n_iter):
        r = inv_k / (ps @ c)
        c = inv_n / (r.T @ ps).T
    ps *= r
    return np.argmax(ps, axis=0)


def torch_matvec(M: torch.Tensor, n_iter: int) -> torch.Tensor:
    n, k = M.shape
    a = torch.full((n,), 1.0 / n, dtype=M.dtype, device=M.device)
    b = torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device)
    v = torch.ones(k, dtype=M.dtype, device=M.device)
    for _ in range(n_iter):
        u = a / (M @ v)
        v = b / (M.T @ u)
    return (M * v).argmax(1)


def swav_inplace(scores: torch.Tensor, eps: float, n_iter: int) -> torch.Tensor:
    q = torch.exp(scores / eps).T  # K x B, a transposed view, as in SwAV
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return q.argmax(0)


def pot_sinkhorn(scores: np.ndarray, lamb: float, n_iter: int) -> np.ndarray:
    import ot

    n, k = scores.shape
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ot.sinkhorn(a, b, -np.asarray(scores, dtype=np.float64), reg=1.0 / lamb, numItermax=n_iter,
                           stopThr=0.0)
    return plan.argmax(1)
