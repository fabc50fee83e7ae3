"""Peer Sinkhorn implementations, written from their published algorithms, for
side-by-side benchmarks. Each runs exactly ``n_iter`` iterations and returns the
L1 violation of both marginals of its plan (total mass 1), so one call serves
per-iteration timing (two lengths, differenced) and error-versus-time curves.

- ``sela_numpy``: SeLa's CPU loop: ``r = 1/K / (P^lamb c)``, ``c = 1/N / (r^T P^lamb)``
  on the K x N float64 matrix of probabilities raised to lamb.
- ``torch_matvec``: SeLa's GPU-style loop in torch: two matrix-vector products
  per iteration on the exponentiated matrix.
- ``swav_inplace``: SwAV / DINOv2 style: ``Q = exp(scores / eps)^T``, normalised by
  its total, then rows and columns divided in place each iteration.
- ``pot_sinkhorn`` / ``pot_sinkhorn_log``: POT's ``ot.sinkhorn`` and
  ``ot.bregman.sinkhorn_log`` with cost ``-S`` and ``reg = 1/lamb``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def sela_numpy(probs: np.ndarray, lamb: float, n_iter: int) -> float:
    n, k = probs.shape
    ps = np.ascontiguousarray(probs.T, dtype=np.float64)  # K x N, as SeLa holds it
    ps **= lamb  # in place, as SeLa does
    r = np.ones((k, 1)) / k
    c = np.ones((n, 1)) / n
    inv_k, inv_n = 1.0 / k, 1.0 / n
    for _ in range(n_iter):
        r = inv_k / (ps @ c)
        c = inv_n / (r.T @ ps).T
    # c was updated last: samples are exact, the cluster side carries the error
    return float(np.abs(r[:, 0] * (ps @ c)[:, 0] - inv_k).sum())


def torch_matvec(M: torch.Tensor, n_iter: int) -> float:
    n, k = M.shape
    a = torch.full((n,), 1.0 / n, dtype=M.dtype, device=M.device)
    b = torch.full((k,), 1.0 / k, dtype=M.dtype, device=M.device)
    v = torch.ones(k, dtype=M.dtype, device=M.device)
    u = a
    for _ in range(n_iter):
        u = a / (M @ v)
        v = b / (M.T @ u)
    return float((u * (M @ v) - a).abs().sum())  # v was updated last: columns are exact


def swav_start(scores: torch.Tensor, eps: float) -> torch.Tensor:
    """SwAV's Q before its iterations: K x B, a transposed view, normalised to total mass 1."""
    q = torch.exp(scores / eps).T
    q /= q.sum()
    return q


def swav_steps(q: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``n_iter`` of SwAV's in-place iterations on ``q`` (K x B)."""
    k, b = q.shape
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return q


def swav_error(q: torch.Tensor) -> float:
    """L1 error of both marginals of SwAV's ``q`` (K x B)."""
    k, b = q.shape
    return float((q.sum(1) - 1.0 / k).abs().sum() + (q.sum(0) - 1.0 / b).abs().sum())


def swav_inplace(scores: torch.Tensor, eps: float, n_iter: int) -> float:
    return swav_error(swav_steps(swav_start(scores, eps), n_iter))


def _pot(solver, scores: np.ndarray, lamb: float, n_iter: int) -> float:
    n, k = scores.shape
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = solver(a, b, -np.asarray(scores, dtype=np.float64), reg=1.0 / lamb, numItermax=n_iter, stopThr=0.0)
    return float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())


def pot_sinkhorn(scores: np.ndarray, lamb: float, n_iter: int) -> float:
    import ot

    return _pot(ot.sinkhorn, scores, lamb, n_iter)


def pot_sinkhorn_log(scores: np.ndarray, lamb: float, n_iter: int) -> float:
    import ot

    return _pot(ot.bregman.sinkhorn_log, scores, lamb, n_iter)
