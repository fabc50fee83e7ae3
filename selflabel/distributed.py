"""Cross-rank reductions for the solver loop, on torch.distributed (gloo or NCCL).

Every rank holds its own rows; the column side is global. Per iteration the
scaling form needs one ``all_reduce`` of the (H, K) column sums; the log form
needs two (max, then sum of shifted exponentials: a log-sum-exp across ranks).
Without a process group every method is the identity, so the solver has one
code path.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Any

import numpy as np
import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None


class RankInputError(ValueError):
    """Raised on every rank when some rank's input is invalid or the ranks' options differ
    (instead of a hang or an abort)."""


class RankFailedError(RuntimeError):
    """Raised on the other ranks when one rank's local work fails during a solve."""


def _fingerprint(value: Any) -> float:
    """A float64 that is equal on two ranks when ``value`` is (numbers by value, everything
    else by a CRC-32 of its bytes, exact in float64)."""
    if value is None:
        return -1.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        return x if math.isfinite(x) else float(zlib.crc32(repr(x).encode()))
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = np.ascontiguousarray(torch.as_tensor(value).detach().cpu().double().numpy())
        return float(zlib.crc32(repr(arr.shape).encode() + arr.tobytes()))
    return float(zlib.crc32(str(value).encode()))


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"<{type(value).__name__} of shape {tuple(value.shape)}>"
    return repr(value)


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

    def agree(self, error: Exception | None, n: int, options: dict[str, Any],
              row_marginal_given: bool = False) -> tuple[int, int]:
        """Check every rank's input and options at once; return (total rows, this rank's first row).

        ``options`` maps the name of every option that shapes the collectives or the answer
        (dtype, H, K, lamb, ...) to its value on this rank (numbers, strings, tensors or None).
        One all_reduce carries each rank's error flag and a fingerprint of every option (as max
        and -min), one all_gather the row counts. A rank with bad input re-raises its own
        error; the others raise RankInputError. Options that differ between ranks make every
        rank raise RankInputError naming them.
        """
        if not self.active:
            if error is not None:
                raise error
            return n, 0
        names = [*options, "row_marginal given"]
        prints = [_fingerprint(v) for v in options.values()] + [float(row_marginal_given)]
        vec = torch.tensor([float(error is not None), *prints, *(-p for p in prints)], dtype=torch.float64,
                           device=self._device())
        self.max_(vec)
        counts = [torch.zeros(1, dtype=torch.float64, device=self._device()) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([float(n)], dtype=torch.float64, device=self._device()), group=self.group)
        sizes = [int(c.item()) for c in counts]
        if error is not None:
            raise error
        if vec[0] > 0:
            raise RankInputError(f"rank {self.rank}: another rank's input is invalid (see its error); "
                                 "no rank solves")
        m = len(prints)
        differ = [name for i, name in enumerate(names) if vec[1 + i] != -vec[1 + m + i]]
        if "row_marginal given" in differ:
            raise RankInputError("row_marginal must be given on every rank (its shard) or on none")
        if differ:
            raise RankInputError(f"ranks disagree on {', '.join(differ)}: every rank must pass the same "
                                 f"{'value' if len(differ) == 1 else 'values'} (this rank has "
                                 + ", ".join(f"{k}={_describe(options[k])}" for k in differ) + ")")
        return sum(sizes), sum(sizes[: self.rank])

    def check(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank hit ``error`` in local work since the last collective.

        A rank that failed re-raises its own exception; the others raise RankFailedError. Every
        rank must call this at the same point (it is one small all_reduce)."""
        if not self.active:
            if error is not None:
                raise error
            return
        flag = torch.tensor([float(error is not None)], dtype=torch.float64, device=self._device())
        self._raise_if_failed(self.max_(flag)[0], error)

    def _raise_if_failed(self, flag: torch.Tensor, error: BaseException | None) -> None:
        if error is not None:
            raise error
        if float(flag) > 0:
            raise RankFailedError(f"rank {self.rank}: another rank failed during the solve (see its error); "
                                  "every rank stopped")

    def sum_checked_(self, t: torch.Tensor, error: BaseException | None) -> torch.Tensor:
        """``sum_(t)`` that also carries this rank's failure flag: if any rank failed (its local
        work raised ``error``), every rank raises instead of waiting for it."""
        if not self.active:
            if error is not None:
                raise error
            return t
        flat = torch.cat([torch.zeros_like(t).reshape(-1) if error is not None else t.reshape(-1),
                          torch.tensor([float(error is not None)], dtype=t.dtype, device=t.device)])
        self.sum_(flat)
        self._raise_if_failed(flat[-1], error)
        t.copy_(flat[:-1].view_as(t))
        return t

    def logsumexp_checked_(self, logw: torch.Tensor, error: BaseException | None) -> torch.Tensor:
        """``logsumexp_(logw)`` with this rank's failure flag carried by its max step."""
        if not self.active:
            if error is not None:
                raise error
            return logw
        flat = torch.cat([torch.full_like(logw, float("-inf")).reshape(-1) if error is not None else logw.reshape(-1),
                          torch.tensor([float(error is not None)], dtype=logw.dtype, device=logw.device)])
        self.max_(flat)
        self._raise_if_failed(flat[-1], error)
        m = flat[:-1].view_as(logw)
        m_safe = torch.where(torch.isfinite(m), m, 0)
        s = self.sum_(torch.exp(logw - m_safe))
        return m_safe + torch.log(s)

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
