"""Drop-in replacements for the Sinkhorn functions of SwAV, DINOv2 and SeLa.

Change one import; inputs and outputs keep the peer's contract, the passes run on
selflabel's fused kernels, and large ``1/epsilon`` no longer overflows.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..distributed import Reducer
from ..solver import sinkhorn_knopp


def _world_group():
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def balanced_assignments(scores: torch.Tensor, lamb: float, n_iter: int) -> torch.Tensor:
    """SwAV-style fixed-iteration equipartition: (B, K) scores -> (B, K) soft assignments
    whose rows sum to 1, all-reducing across ranks when torch.distributed is initialised.

    Same iterates as the peers' loop (clusters normalised first, against uniform sample
    weights, then samples), computed stably: the first cluster normalisation is a
    log-sum-exp, the rest runs in selflabel's solver with that as a warm start.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, K), got {tuple(scores.shape)}")
    x = scores.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    group = _world_group()
    red = Reducer(group)
    k = x.shape[1]
    log_v1 = -math.log(k) - red.logsumexp_(torch.logsumexp(lamb * x, dim=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot be balanced")  # per-batch use: B < K is normal
        res = sinkhorn_knopp(x, lamb=lamb, tol=0, max_iter=n_iter, init=log_v1, process_group=group)
    return res.plan(normalize_rows=True)
