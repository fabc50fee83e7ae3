"""Drop-in for SwAV's ``distributed_sinkhorn``.

    # from main_swav import distributed_sinkhorn
    from selflabel.compat.swav import distributed_sinkhorn
"""

from __future__ import annotations

import torch

from . import balanced_assignments


@torch.no_grad()
def distributed_sinkhorn(out: torch.Tensor, epsilon: float = 0.05, sinkhorn_iterations: int = 3) -> torch.Tensor:
    """Codes for a batch: ``out`` (B, K) prototype scores -> Q (B, K), each row summing to 1.

    Equal to SwAV's function (``Q = exp(out / epsilon)``, normalised by its total, then
    ``sinkhorn_iterations`` rounds of cluster and sample normalisation, all-reduced across
    ranks when torch.distributed is initialised), without its overflow for small epsilon.
    """
    return balanced_assignments(out, 1.0 / epsilon, sinkhorn_iterations)
