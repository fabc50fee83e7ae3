"""The result object returned by every solver entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
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

    No field carries an autograd graph: the solver runs under ``torch.no_grad`` and
    ``plan()`` too, so scores with ``requires_grad=True`` give plain tensors. (Gradients
    through the Sinkhorn fixed point are not implemented; a graph through the last
    iterations only would give wrong gradients.)
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

    @torch.no_grad()
    def plan(self, rows: slice | torch.Tensor | None = None, *, scores: Any = None,
             normalize_rows: bool = False) -> torch.Tensor:
        """Soft assignments ``Q`` for a slice (or index tensor) of rows.

        Computed in float64 from the scores and the duals, returned in the solver's
        dtype, so its marginals are those ``error`` reports up to the rounding of the duals
        in that dtype. Carries no autograd graph (see ``SinkhornResult``).

        Args:
            rows: rows to return (default: all). Recomputed from the scores, so a slice
                costs memory proportional to its size only.
            scores: the scores of those rows, (n, K) or (H, n, K), as given to the solver.
                Needed where the result keeps no reference to them (backend="chunked",
                features); otherwise the solver's input is used.
            normalize_rows: divide each row by its sum, giving per-sample cluster
                distributions (rows sum to 1) instead of transport mass (rows sum to a_i).

        Returns:
            (n, K) tensor, or (H, n, K) for stacked heads, in the solver's dtype.
        """
        if self._rowmax is None:
            raise RuntimeError("this result keeps no row shifts to build its plan from")
        heads, n = self._rowmax.shape
        rows = slice(None) if rows is None else rows
        picked = torch.arange(n)[rows]
        if scores is None:
            if self._scores is None:
                raise ValueError("scores=: this result keeps no reference to its scores (backend='chunked' and "
                                 "features never keep them); pass the scores of the rows, e.g. "
                                 "res.plan(slice(lo, hi), scores=block)")
            s = self._scores[:, rows]
        else:
            s = torch.as_tensor(np.ascontiguousarray(scores) if isinstance(scores, np.ndarray) else scores)
            s = s.detach().to(self._rowmax.device)
            s = s if s.dim() == 3 else s.unsqueeze(0)
            k = self.log_v.shape[-1]
            if tuple(s.shape) != (heads, len(picked), k):
                want = (len(picked), k) if self.log_v.dim() == 1 else (heads, len(picked), k)
                raise ValueError(f"scores= must have shape {want} for these rows, got {tuple(scores.shape)}")
        f64 = torch.float64
        s = s.to(self.log_v.dtype).to(f64)  # the values the solver saw, then exact
        if self.kind == "probs":
            s = torch.log(s)
        log_u = self.log_u.reshape(heads, -1)[:, rows].to(f64)
        rowmax = self._rowmax[:, rows].to(f64)
        log_v = self.log_v.reshape(heads, -1).to(f64)
        logq = self.lamb * (s - rowmax[..., None]) + log_u[..., None] + log_v[:, None, :]
        q = torch.softmax(logq, dim=-1) if normalize_rows else torch.exp(logq)
        q = q.to(self.log_v.dtype)
        return q if self.log_v.dim() == 2 else q[0]
