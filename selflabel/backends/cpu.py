"""Fused C++ CPU backend: thin wrappers over selflabel._C (csrc/bindings.cpp, csrc/kernels.h)."""

from __future__ import annotations

import torch

from . import BackendBase, Prepared, ScoreBlock


def _ext():
    try:
        from selflabel import _C
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError(
            "selflabel._C is not built; install from source with "
            "`pip install --no-build-isolation -e .` or use backend='torch'"
        ) from exc
    return _C


def _operands(mat) -> tuple[torch.Tensor, dict]:
    """The matrix argument of a pass and, for a ``ScoreBlock``, the score-mode keywords."""
    if isinstance(mat, ScoreBlock):
        return mat.scores, {"shift": mat.shift, "lamb": float(mat.lamb), "probs": mat.probs}
    return mat, {}


class CpuBackend(BackendBase):
    """``threads``: at most this many worker threads per pass; 0 (the default) means
    ``torch.get_num_threads()``. A pass also gets at most one thread per 65,536 entries, and never
    waits for a helper thread that the scheduler has not run (csrc/kernels.h, ``RowChunks``)."""

    name = "cpu"
    recomputes_rows = True  # the passes accept a ScoreBlock
    absorbs = True  # prepare takes col_pot

    def __init__(self, threads: int = 0) -> None:
        self._C = _ext()
        self.threads = threads

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool,
                col_pot: torch.Tensor | None = None) -> Prepared:
        out = self._C.prepare(scores, float(lamb), probs, exponentiate, threads=self.threads,
                              col_pot=None if col_pot is None else col_pot.contiguous())
        return Prepared(*out[:5], out[5] if col_pot is not None else None)

    def log_view(self, prep: Prepared, scores: torch.Tensor, lamb: float, probs: bool) -> ScoreBlock:
        """The log kernel of ``prep``, recomputed row by row from the scores inside the passes."""
        return ScoreBlock(scores, prep.rowmax, float(lamb), probs)

    def scaling_pass(self, M, a, u, v, omega=1.0):
        M, mode = _operands(M)
        return self._C.scaling_pass(M, a, u, v, omega=float(omega), threads=self.threads, **mode)

    def log_pass(self, L, log_a, f, g, omega=1.0):
        L, mode = _operands(L)
        return self._C.log_pass(L, log_a, f, g, omega=float(omega), threads=self.threads, **mode)

    def column_sums(self, M: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """w = M^T u per head: (H, K)."""
        return self._C.column_sums(M, u.contiguous(), threads=self.threads)

    def normalised_rows(self, M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows of M diag(v), each divided by its sum: (H, N, K)."""
        return self._C.normalised_rows(M, v.contiguous(), threads=self.threads)

    def labels(self, mat, log_v, linear, row_offset=0):
        mat, mode = _operands(mat)
        return self._C.labels(mat, log_v.contiguous(), linear, **mode, threads=self.threads, row_offset=row_offset)
