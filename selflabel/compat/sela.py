"""Drop-in for SeLa's label optimisation (``optimize_L_sk``'s Sinkhorn loop).

    # self.L[nh] = ... optimize_L_sk(...)
    labels = selflabel.compat.sela.optimize_labels(PS, lamb=25)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..solver import sinkhorn_knopp


def optimize_labels(PS, lamb: float = 25.0, dtype=np.float64, max_iter: int = 100_000) -> np.ndarray:
    """Hard labels for N x K softmax probabilities ``PS``, as SeLa computes them.

    SeLa iterates ``r = 1/K / (P^lamb c)``, ``c = 1/N / (r^T P^lamb)`` from ``c = 1/N``
    and stops when ``sum |c / c_new - 1| < 0.1``, checked every 10 iterations; labels are
    ``argmax_k r_k P_ik^lamb``. This runs the same iterates (same stop, same labels) on
    selflabel's fused kernels, with ``P^lamb`` never formed in linear space.

    Returns int64 labels (N,). ``dtype`` is np.float64 (SeLa's default) or np.float32.
    """
    P = torch.as_tensor(np.asarray(PS))
    cdtype = {np.float64: torch.float64, np.float32: torch.float32}.get(np.dtype(dtype).type)
    if cdtype is None:
        raise ValueError(f"dtype must be np.float64 or np.float32, got {dtype!r}")
    P = P.to(cdtype)
    n, k = P.shape
    # SeLa's first r from c = 1/N, in log space: log r_1 = log(N/K) - LSE_i(lamb log P_ik)
    log_r1 = math.log(n / k) - torch.logsumexp(lamb * torch.log(P.double()), dim=0)
    res = sinkhorn_knopp(P, kind="probs", lamb=lamb, dtype=cdtype, criterion="sela", tol=0.1, check_every=10,
                         max_iter=max_iter, init=log_r1)
    return res.labels.numpy()
