"""CARP's loss: consistent assignment of views over random partitions of the prototypes.

Silva & Ramirez Rivera, "Representation Learning via Consistent Assignment of Views over
Random Partitions", NeurIPS 2023. Every step the K prototypes are shuffled into NP blocks of
NB (``random_blocks``, the same on every rank); within a block each view's logits become a
softmax over NB prototypes. The loss has two terms, averaged over blocks:

- consistency: ``-log <p_i, q_j>`` between each student view i and each teacher view j != i
  (teacher views detached), averaged over the batch and the view pairs;
- entropy: ``KL(mean assignment over the batch || uniform) = log NB + sum_c pbar_c log pbar_c``,
  the mean taken over every view of every sample on every rank, which keeps blocks from collapsing.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist


def random_blocks(k: int, block_size: int, gen: torch.Generator, n_blocks: int | None = None) -> torch.Tensor:
    """Shuffle ``range(k)`` and cut the first ``n_blocks * block_size`` into blocks: (NP, NB) long tensor.

    ``n_blocks`` defaults to ``k // block_size`` (every prototype in a block, up to the remainder);
    fewer blocks leave a random rest of the prototypes out of this step's tasks.
    """
    if not 1 < block_size <= k:
        raise ValueError(f"--carp-block must be in [2, ncl={k}], got {block_size}")
    n_blocks = k // block_size if n_blocks is None else n_blocks
    if not 1 <= n_blocks <= k // block_size:
        raise ValueError(f"--carp-blocks must be in [1, ncl // carp_block = {k // block_size}], got {n_blocks}")
    return torch.randperm(k, generator=gen)[: n_blocks * block_size].view(n_blocks, block_size)


def block_softmax(logits: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (NP, B, NB) probabilities, a softmax within each block."""
    return torch.softmax(logits[:, blocks].transpose(0, 1), dim=-1)


def _gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (.., B, ..) along dim 1 across ranks, keeping the gradient of the local part."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=1)


def carp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
              blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CARP's (consistency, entropy) terms.

    Args:
        student: logits (B, K) of every view through the student (global views first).
        teacher: logits (B, K) of the global views through the teacher (gradients are not taken).
        blocks: (NP, NB) prototype indices from ``random_blocks``.
    """
    eps = torch.finfo(student[0].dtype).eps
    p = [block_softmax(s, blocks) for s in student]
    q = [block_softmax(t.detach(), blocks) for t in teacher]
    pairs = [(i, j) for i in range(len(p)) for j in range(len(q)) if i != j]
    if not pairs:
        raise ValueError("CARP needs at least two views (two global, or one global and local ones)")
    consistency = sum(-torch.log((p[i] * q[j]).sum(-1).clamp(eps, 1 - eps)).mean() for i, j in pairs) / len(pairs)
    mean = _gather_batch(torch.cat(p + q, dim=1)).mean(dim=1)  # (NP, NB)
    entropy = (math.log(blocks.shape[1]) + (mean * torch.log(mean.clamp(eps, 1 - eps))).sum(-1)).mean()
    return consistency, entropy


class CarpStep:
    """One CARP training step and its EMA teacher (a frozen copy of the network made at the start).

    ``loss`` runs every view through the student and the two global views through the teacher, and
    scores them on this step's random prototype blocks (seeded by the run's seed and the step, so
    every rank draws the same); ``update`` moves the teacher towards the student with a momentum
    that rises from ``momentum`` to 1 on a cosine schedule over ``total_steps``.
    """

    def __init__(self, net: torch.nn.Module, *, ncl: int, block: int, n_blocks: int | None, momentum: float,
                 seed: int, total_steps: int) -> None:
        self.teacher = copy.deepcopy(net).requires_grad_(False)
        self.ncl, self.block, self.n_blocks = ncl, block, n_blocks
        self.momentum, self.seed, self.total_steps = momentum, seed, total_steps

    def loss(self, model: torch.nn.Module, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        student = list(model(torch.cat(views)).chunk(len(views)))
        with torch.no_grad():
            teacher = list(self.teacher(torch.cat(views[:2])).chunk(2))
        gen = torch.Generator().manual_seed(self.seed + 104729 * step)
        consistency, entropy = carp_loss(student, teacher, random_blocks(self.ncl, self.block, gen, self.n_blocks))
        return consistency + entropy, {"train/consistency": consistency.item(), "train/entropy": entropy.item()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        m = 1 - (1 - self.momentum) * (math.cos(math.pi * step / self.total_steps) + 1) / 2
        for pt, ps in zip(self.teacher.parameters(), net.parameters(), strict=True):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        for bt, bs in zip(self.teacher.buffers(), net.buffers(), strict=True):
            bt.copy_(bs)
