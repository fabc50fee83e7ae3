"""Cross-rank reductions for the solver loop, on torch.distributed (gloo or NCCL).

Every rank holds its own rows; the column side is global. Per iteration the
scaling form needs one ``all_reduce`` of the (H, K) column sums; the log form
needs two (max, then sum of shifted exponentials: a log-sum-exp across ranks).
Without a process group every method is the identity, so the solver has one
code path.
"""

from __future__ import annotations

import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None


class RankInputError(ValueError):
    """Raised on every rank when some rank's input is invalid (instead of a hang)."""


class Reducer:
    def __init__(self, group=None) -> None:
        if group is not None and (dist is None or not dist.is_initialized()):
            raise ValueError("process_group given but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (or pass process_group=None)")
        self.group = group
        self.active = group is not None
        self.rank = dist.get_rank(group) if self.active else 0
        self.world = dist.get_world_size(group) if self.active else 1

    def _device(self) -> torch.device:
        if self.active and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.active:
            return t
        dev = self._device()
        if t.device == dev or dev.type == "cpu":
            dist.all_reduce(t, op=op, group=self.group)
        else:  # NCCL reduces CUDA tensors only (CPU or chunked solves keep their vectors on the host)
            moved = t.to(dev)
            dist.all_reduce(moved, op=op, group=self.group)
            t.copy_(moved)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM if self.active else None)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX if self.active else None)

    def logsumexp_(self, logw: torch.Tensor) -> torch.Tensor:
        """log of the cross-rank sum of exp(logw), elementwise."""
        if not self.active:
            return logw
        m = self.max_(logw.clone())
        m_safe = torch.where(torch.isfinite(m), m, 0)
        s = self.sum_(torch.exp(logw - m_safe))
        return m_safe + torch.log(s)

    def agree(self, error: Exception | None, heads: int, k: int, n: int, row_marginal_given: bool = False) -> int:
        """Check every rank's input at once; return the total number of rows.

        One collective carries each rank's error flag, H, K and whether it passed a
        row_marginal (then one sums N). A rank with bad input re-raises its own error; the
        others raise RankInputError. Ranks that disagree on H, K or row_marginal all raise
        RankInputError.
        """
        if not self.active:
            if error is not None:
                raise error
            return n
        given = float(row_marginal_given)
        info = torch.tensor([float(error is not None), heads, -heads, k, -k, given, -given], dtype=torch.float64,
                            device=self._device())
        self.max_(info)
        total = self.sum_(torch.tensor([float(n)], dtype=torch.float64, device=self._device()))
        if error is not None:
            raise error
        if info[0] > 0:
            raise RankInputError(f"rank {self.rank}: another rank's input is invalid (see its error); "
                                 "no rank solves")
        if info[5] != -info[6]:
            raise RankInputError("row_marginal must be given on every rank (its shard) or on none")
        if info[1] != -info[2] or info[3] != -info[4]:
            raise RankInputError(f"ranks disagree on the number of heads or clusters: H in "
                                 f"[{int(-info[2])}, {int(info[1])}], K in [{int(-info[4])}, {int(info[3])}]; "
                                 "every rank must pass scores with the same K (and H)")
        return int(total.item())

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate (H, N_r) tensors along rows in rank order (unequal N_r allowed)."""
        if not self.active:
            return t
        dev = t.device if dist.get_backend(self.group) != "nccl" else self._device()
        n = torch.tensor([t.shape[-1]], device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(*t.shape[:-1], longest, dtype=t.dtype, device=dev)
        padded[..., : t.shape[-1]] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[..., : int(s.item())] for p, s in zip(parts, sizes, strict=True)], dim=-1).to(t.device)
