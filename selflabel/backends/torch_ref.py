"""Reference backend in plain torch ops (any device). Reads the matrix several
times per iteration; it defines what the fused kernels must compute."""

from __future__ import annotations

import torch

from ..accel import relaxed_step
from . import BackendBase, Prepared

SUM_SCALE = 2.0**-64


class TorchBackend(BackendBase):
    name = "torch"
    absorbs = True

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool,
                col_pot: torch.Tensor | None = None) -> Prepared:
        # summed scaled by 2**-64 (exact) so that finite float64 scores cannot overflow the sum
        if scores.dtype == torch.float64:
            rowsum = (scores * SUM_SCALE).sum(-1) / SUM_SCALE
        else:
            rowsum = scores.sum(-1, dtype=torch.float64)
        rowmin = scores.amin(-1).double()
        x = torch.log(scores) if probs else scores
        rowmax = x.amax(-1)
        ok = ~torch.isnan(rowsum) & torch.isfinite(rowmax)  # -inf entries are fine (no mass)
        mat = lamb * (x - torch.where(ok, rowmax, 0)[..., None])
        mat = torch.where(ok[..., None], mat, 0)
        colmax = mat.amax(1)
        mat, row_pot = absorb(mat, col_pot)
        if exponentiate:
            mat = torch.exp(mat)
        return Prepared(mat, rowmax, colmax, rowsum, rowmin, row_pot)

    def scaling_pass(self, M, a, u, v, omega=1.0):
        t = torch.bmm(M, v[..., None])[..., 0].double()
        u_new = a.double() / t
        if omega != 1.0:
            u_old = u.double()
            u_new = u_old * torch.exp(relaxed_step(torch.log(u_new / u_old), omega))
        change = (u.double() / u_new - 1).abs().sum(-1)
        u.copy_(u_new)
        w = torch.bmm(u[:, None, :], M)[:, 0, :]
        return w, change

    def log_pass(self, L, log_a, f, g, omega=1.0):
        f_new = log_a - torch.logsumexp(L + g[:, None, :], dim=-1)
        if omega != 1.0:
            f_new = f + relaxed_step(f_new - f, omega)
        change = torch.expm1(f.double() - f_new.double()).abs().sum(-1)
        f.copy_(f_new)
        logw = torch.logsumexp(L + f[..., None], dim=1) + g
        return logw, change

    def column_sums(self, M, u):
        return torch.bmm(u[:, None, :], M)[:, 0, :]

    def normalised_rows(self, M, v):
        q = M * v[:, None, :]
        return q.div_(q.sum(-1, keepdim=True))

    def labels(self, mat, log_v, linear, row_offset=0):
        vals = mat * torch.exp(log_v)[:, None, :] if linear else mat + log_v[:, None, :]
        return argmax_round(vals, row_offset, linear)


def absorb(log_kernel: torch.Tensor, col_pot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_kernel + col_pot`` with every row shifted back to a maximum of 0, and the row
    potentials of that shift (in place); unchanged and None without ``col_pot``."""
    if col_pot is None:
        return log_kernel, None
    log_kernel = log_kernel.add_(col_pot[:, None, :])
    row_pot = -log_kernel.amax(-1)
    return log_kernel.add_(row_pot[..., None]), row_pot


TIE_ULPS = 64  # values within this many roundings of a row's maximum count as tied


def argmax_round(vals: torch.Tensor, row_offset: int = 0, linear: bool = False) -> torch.Tensor:
    """argmax over the last axis of (H, n, K) values; ties go round the clusters: row i
    (global index ``row_offset + i``) takes the first maximum at or after column i mod K.
    Values within ``TIE_ULPS`` roundings of the maximum (relative for ``linear`` values,
    else relative to max(1, |max|)) count as tied. Works on row blocks of about 2**22
    entries, so its int64 temporaries stay small."""
    h, n, k = vals.shape
    out = torch.empty(h, n, dtype=torch.long, device=vals.device)
    cols = torch.arange(k, device=vals.device)
    slack = TIE_ULPS * torch.finfo(vals.dtype).eps
    step = max(1, 2**22 // max(1, h * k))
    for lo in range(0, n, step):
        block = vals[:, lo:lo + step]
        start = (row_offset + lo + torch.arange(block.shape[1], device=vals.device)) % k
        best = block.amax(-1, keepdim=True)
        tied = block >= (best - slack * best if linear else best - slack * best.abs().clamp(min=1))
        steps = torch.where(tied, (cols - start[:, None]) % k, k)  # distance from the row's start column
        out[:, lo:lo + step] = (steps.amin(-1) + start) % k
    return out
