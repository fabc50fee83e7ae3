"""The result object returned by every solver entry point."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SinkhornResult:
    """Solution of the equipartition transport problem.

    The plan is ``Q = diag(exp(log_u)) exp(lamb * (S - rowmax)) diag(exp(log_v))``, with
    ``rowmax = max_j S_ij`` taken on log-scores (``log P`` when ``kind="probs"``). For H
    stacked heads every field gains a leading H axis.

    Attributes:
        labels: hard labels, int64 (N,) or (H, N): ``argmax_j lamb*S_ij + log_v_j``.
        log_u: row potentials (N,) or (H, N).
        log_v: column potentials (K,) or (H, K); pass the result as ``init=`` to warm start.
        n_iter: iterations run (the largest over heads).
        converged: whether the stopping criterion was met (for every head).
        error: L1 violation of the marginals of the returned plan (largest over heads);
            the plan's rows match ``row_marginal`` exactly, so this is the column error.
        history: ``(iteration, value)`` of the stopping criterion at every check.
        seconds: wall-clock time of the solve, preparation included.
        algorithm: the algorithm that produced the duals ("scaling" or "log"); "auto" may
            have switched from scaling to log, which is recorded in ``switched_at`` (the
            iteration whose state the log form resumed from; later scaling iterations are redone).
        backend: the backend that ran the passes.
    """

    labels: torch.Tensor
    log_u: torch.Tensor
    log_v: torch.Tensor
    n_iter: int
    converged: bool
    error: float
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    algorithm: str = "scaling"
    backend: str = "torch"
    switched_at: int | None = None
    lamb: float = 25.0
    kind: str = "logits"
    _scores: torch.Tensor | None = field(default=None, repr=False)
    _rowmax: torch.Tensor | None = field(default=None, repr=False)

    def plan(self, rows: slice | torch.Tensor | None = None, *, normalize_rows: bool = False) -> torch.Tensor:
        """Soft assignments ``Q`` for a slice (or index tensor) of rows.

        Args:
            rows: rows to return (default: all). Recomputed from the scores, so a slice
                costs memory proportional to its size only.
            normalize_rows: divide each row by its sum, giving per-sample cluster
                distributions (rows sum to 1) instead of transport mass (rows sum to a_i).

        Returns:
            (n, K) tensor, or (H, n, K) for stacked heads, in the solver's dtype.
        """
        if self._scores is None or self._rowmax is None:
            raise RuntimeError("this result holds no reference to its scores (backend='chunked' never keeps "
                               "them); compute the plan of a row block from log_u, log_v and your scores")
        rows = slice(None) if rows is None else rows
        s = self._scores[:, rows].to(self.log_v.dtype)
        if self.kind == "probs":
            s = torch.log(s)
        log_u = self.log_u.reshape(-1, self.log_u.shape[-1])[:, rows]
        rowmax = self._rowmax[:, rows]
        log_v = self.log_v.reshape(-1, self.log_v.shape[-1])
        logq = self.lamb * (s - rowmax[..., None]) + log_u[..., None] + log_v[:, None, :]
        if normalize_rows:
            q = torch.softmax(logq, dim=-1)
        else:
            q = torch.exp(logq)
        return q if self.log_v.dim() == 2 else q[0]
