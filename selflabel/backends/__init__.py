"""Backends: the passes over the kernel matrix, behind the one solver front.

A backend prepares the kernel matrix from the scores and runs single passes over
it; it never validates user input, decides when to stop, or builds results (the
front in ``selflabel.solver`` does). Every backend implements ``Backend``; which one runs a
solve is decided in ``selflabel.select`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch


class Prepared(NamedTuple):
    """Output of ``Backend.prepare`` for scores of shape (H, N, K)."""

    mat: torch.Tensor  # (H, N, K): lamb*(x - m) (log kernel) or its exp (scaling kernel)
    rowmax: torch.Tensor  # (H, N): m_i = max_j x_ij, x = log-scores
    colmax: torch.Tensor  # (H, K): max_i lamb*(x_ij - m_i), <= 0
    rowsum: torch.Tensor  # (H, N) float64: sum_j of the raw scores (validation)
    rowmin: torch.Tensor  # (H, N) float64: min_j of the raw scores (validation)
    # (H, N) with absorbed column potentials g (``col_pot``): f_i = -max_j (lamb*(x_ij - m_i) + g_j), the
    # kernel being exp(lamb*(x - m) + f_i + g_j) (rows of maximum 1); None otherwise
    row_pot: torch.Tensor | None = None


class ScoreBlock(NamedTuple):
    """Raw scores of a row block whose kernel rows the pass recomputes as it reads them
    (backends with ``recomputes_rows = True``): lamb * (x - shift), exponentiated for the
    scaling form and for linear labels, x = log(scores) for probabilities. Used by the
    chunked backend so a pass never writes a block's kernel matrix."""

    scores: torch.Tensor  # (H, n, K) in the compute dtype, contiguous
    shift: torch.Tensor  # (H, n): the row max ``prepare`` returned for these rows
    lamb: float
    probs: bool


class Backend(Protocol):
    name: str
    log_only: bool  # runs the log domain only: the front refuses algorithm="scaling"
    absorbs: bool  # prepare takes col_pot= (the stabilised scaling form)
    recomputes_rows: bool  # the passes accept a ScoreBlock and recompute kernel rows from it

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        """Build the kernel matrix from (H, N, K) scores in the compute dtype. Backends with
        ``absorbs = True`` also take ``col_pot=`` (H, K): column potentials absorbed into the
        kernel, rows renormalised to a maximum of 1 (``Prepared.row_pot``): the stabilised
        scaling form keeps its scalings near 1 with them."""

    def scaling_pass(
        self, M: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor, omega: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u <- a / (M v) in place; return (w = M^T u (H, K), sum_i |u_old/u_new - 1| (H,)).
        With ``omega`` > 1 the update is over-relaxed per row (``selflabel.accel.relaxed_step``
        on log u): u <- u * exp(relaxed_step(log(a / (u * M v)), omega))."""

    def log_pass(
        self, L: torch.Tensor, log_a: torch.Tensor, f: torch.Tensor, g: torch.Tensor, omega: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f <- log a - LSE_j(L + g) in place (over-relaxed as in ``scaling_pass`` with ``omega`` > 1);
        return (log column mass of the new (f, g) (H, K), row change (H,))."""

    def log_view(self, prep: Prepared, scores: Any, lamb: float, probs: bool) -> Any:
        """The log kernel of a prepared scaling kernel without a new N x K matrix (backends whose
        passes recompute kernel rows from the scores), or None: the front then prepares the log kernel.
        With a view the front checks scaling duals exactly in the log domain at no memory cost."""

    def labels(self, mat: torch.Tensor, log_v: torch.Tensor, linear: bool, row_offset: int = 0) -> torch.Tensor:
        """argmax_j of mat*exp(log_v) (linear) or mat + log_v, int64 (H, N). Ties go round the
        clusters: row i (global index ``row_offset + i``) takes the first maximum at or after
        column i mod K, so rows with equal scores get balanced labels."""


class BackendBase:
    """What a backend can do, declared: every backend inherits these defaults and overrides the
    capabilities it has (see ``Backend``)."""

    log_only = False
    absorbs = False
    recomputes_rows = False
    advance: Callable[[float], None] | None = None  # set by the front: told each row block's share of a pass

    def log_view(self, prep: Prepared, scores: Any, lamb: float, probs: bool) -> Any:
        return None


def resolve_device(device: str | torch.device | None, default: torch.device | None = None) -> torch.device:
    """``device`` as a torch.device ("cuda" -> the current CUDA device), checked to exist;
    ``default`` when it is None. Raises ValueError naming the argument otherwise."""
    if device is None:
        if default is None:
            raise ValueError("device must be given: 'cpu' or 'cuda'")
        return default
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
        current = torch.cuda.current_device()
        if dev.index not in (None, current):  # the Triton kernels launch on the current device
            raise ValueError(f"device={device!r} is not the current CUDA device (cuda:{current}); call "
                             f"torch.cuda.set_device({dev.index}) or solve inside torch.cuda.device({dev.index})")
        dev = torch.device("cuda", current)
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r}: only 'cpu' and 'cuda' are supported")
    return dev
