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


def marginal_errors(res, scores, a=None, b=None) -> tuple[float, float, float, float]:
    """(|mass - 1|, column L1 error, row L1 error, resolution) of ``res.plan(scores=...)``
    in float64, for (N, K) or (H, N, K) scores; the worst head.

    ``resolution`` is how far those marginals may move from the ones the solver measured
    because it computed in its dtype: each entry of the plan is exp(L + f + g) with each
    term rounded, so it is known to about eps * (|L| + |f| + |g|) relative; plus the
    rounding of the sums themselves.
    """
    q = res.plan(scores=scores).double()
    q = q if q.dim() == 3 else q[None]
    h, n, k = q.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else torch.as_tensor(a, dtype=torch.float64)
    b = torch.full((k,), 1.0 / k, dtype=torch.float64) if b is None else torch.as_tensor(b, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    mass = float((q.sum((-2, -1)) - 1).abs().max())
    col = float((q.sum(-2) - b).abs().sum(-1).max())
    row = float((q.sum(-1) - a).abs().sum(-1).max())
    f = res.log_u.double().reshape(h, n)
    g = res.log_v.double().reshape(h, k)
    logq = torch.log(q)
    size = (logq - f[..., None] - g[:, None, :]).abs() + f.abs()[..., None] + g.abs()[:, None, :]
    weighted = torch.where(q > 0, q * size, 0).sum((-2, -1)).max()
    eps = torch.finfo(res.log_v.dtype).eps
    return mass, col, row, float(4 * eps * (weighted + n + k))
