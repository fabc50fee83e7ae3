"""Independent float64 reference used by the tests: plain log-domain Sinkhorn in
torch float64 ops (no selflabel code)."""

from __future__ import annotations

import numpy as np
import torch


def log_sinkhorn(logk: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None,
                 tol: float = 1e-10, max_iter: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Log-domain Sinkhorn on the log-kernel ``logk`` (N, K) in float64.

    Returns the optimal plan Q (N, K) (rows sum to a exactly, columns to b within
    ``tol`` in L1) and the column potentials g (defined up to a constant).
    """
    L = torch.as_tensor(np.asarray(logk, dtype=np.float64))
    n, k = L.shape
    log_a = torch.log(torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else torch.as_tensor(a).double())
    log_b = torch.log(torch.full((k,), 1.0 / k, dtype=torch.float64) if b is None else torch.as_tensor(b).double())
    g = torch.zeros(k, dtype=torch.float64)
    for _ in range(max_iter):
        f = log_a - torch.logsumexp(L + g, dim=1)
        log_col = torch.logsumexp(L + f[:, None], dim=0) + g
        if (torch.exp(log_col) - torch.exp(log_b)).abs().sum() < tol:
            break
        g = g + log_b - log_col
    else:
        raise RuntimeError("reference did not converge")
    return torch.exp(L + f[:, None] + g).numpy(), g.numpy()


def log_scores(scores: np.ndarray, kind: str) -> np.ndarray:
    return np.log(scores) if kind == "probs" else np.asarray(scores, dtype=np.float64)
