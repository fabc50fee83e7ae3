"""Reference backend in plain torch ops (any device). Reads the matrix several
times per iteration; it defines what the fused kernels must compute."""

from __future__ import annotations

import torch

from . import Prepared


class TorchBackend:
    name = "torch"

    def prepare(self, scores: torch.Tensor, lamb: float, probs: bool, exponentiate: bool) -> Prepared:
        rowsum = scores.sum(-1, dtype=torch.float64)
        rowmin = scores.amin(-1).double()
        x = torch.log(scores) if probs else scores
        rowmax = x.amax(-1)
        ok = torch.isfinite(rowsum) & torch.isfinite(rowmax)
        mat = lamb * (x - torch.where(ok, rowmax, 0)[..., None])
        mat = torch.where(ok[..., None], mat, 0)
        colmax = mat.amax(1)
        if exponentiate:
            mat = torch.exp(mat)
        return Prepared(mat, rowmax, colmax, rowsum, rowmin)

    def scaling_pass(self, M, a, u, v):
        t = torch.bmm(M, v[..., None])[..., 0].double()
        u_new = a.double() / t
        change = (u.double() / u_new - 1).abs().sum(-1)
        u.copy_(u_new)
        w = torch.bmm(u[:, None, :], M)[:, 0, :]
        return w, change

    def log_pass(self, L, log_a, f, g):
        f_new = log_a - torch.logsumexp(L + g[:, None, :], dim=-1)
        change = torch.expm1(f.double() - f_new.double()).abs().sum(-1)
        f.copy_(f_new)
        logw = torch.logsumexp(L + f[..., None], dim=1) + g
        return logw, change

    def labels(self, mat, log_v, linear):
        if linear:
            return (mat * torch.exp(log_v)[:, None, :]).argmax(-1)
        return (mat + log_v[:, None, :]).argmax(-1)
