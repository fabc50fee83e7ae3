"""Drop-in for DINOv2's ``DINOLoss.sinkhorn_knopp_teacher``.

    loss = DINOLoss(...)
    loss.sinkhorn_knopp_teacher = selflabel.compat.dinov2.sinkhorn_knopp_teacher
"""

from __future__ import annotations

import torch

from . import balanced_assignments


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets: (B, K) teacher logits -> (B, K) assignments with rows summing to 1, in
    float32 as DINOv2 computes them (``exp(teacher_output / teacher_temp)``, then
    ``n_iterations`` rounds of normalisation, all-reduced across ranks when initialised)."""
    return balanced_assignments(teacher_output.float(), 1.0 / teacher_temp, n_iterations)
