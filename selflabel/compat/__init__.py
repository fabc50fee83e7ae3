"""Drop-in replacements for the Sinkhorn functions of SwAV, DINOv2 and SeLa.

Change one import; inputs and outputs keep the peer's contract, the passes run on
selflabel's fused kernels, and large ``1/epsilon`` no longer overflows.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..distributed import Reducer
from ..select import in_memory
from ..solver import sinkhorn_knopp


def _world_group():
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


# Below this spread of lamb * scores, the scaling form cannot under- or overflow in float32:
# kernel entries exp(lamb (x - rowmax)) stay above e^-40 and so do the ratios of the column
# scalings (a column scaling is a reciprocal of a sum of such entries), so every product
# stays above e^-80, inside float32's normal range (e^-87).
FAST_SPREAD = 40.0
# On a GPU, batches of at most this many entries run the same iterates as a few plain torch ops
# (``_direct_small``): there the fused kernels' launch overhead and prepare pass cost more than they
# save. On an H200 the torch ops were faster up to the largest batch timed, 16384 x 3000.
SMALL_GPU_ENTRIES = 2**26


def balanced_assignments(scores: torch.Tensor, lamb: float, n_iter: int) -> torch.Tensor:
    """SwAV-style fixed-iteration equipartition: (B, K) scores -> (B, K) soft assignments
    whose rows sum to 1, all-reducing across ranks when torch.distributed is initialised.

    The same iterates as the peers' loop (clusters normalised first, against uniform sample
    weights, then samples). Where ``lamb`` times the spread of the scores is at most
    ``FAST_SPREAD`` (SwAV's cosine scores at epsilon 0.05 are), the fused kernels run them
    directly: one pass builds ``exp(lamb (x - rowmax))``, each iteration reads it once, and
    the output is one more product, where the peers' loop reads and writes the matrix about
    ten times per iteration. Otherwise the solver runs them in its stable form (log-sum-exp
    first step, scaling or log domain as needed), so ``exp(scores * lamb)`` never overflows.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, K), got {tuple(scores.shape)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"the number of iterations must be a positive int, got {n_iter!r}")
    x = scores.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    group = _world_group()
    red = Reducer(group)
    fast = None  # whether the scaling form is safe (None: decided from the prepared kernel below)
    if x.is_cuda:  # one reduction decides alike on every rank: the spread and the largest batch
        top, neg_min, entries = _extremes(x, red)
        if math.isfinite(top + neg_min):  # NaN and infinite scores: the checked paths below
            fast = lamb * (top + neg_min) <= FAST_SPREAD
        if fast and entries <= SMALL_GPU_ENTRIES:
            return _direct_small(x, lamb, n_iter, red, top).to(scores.dtype)
    if fast is not False:
        be = in_memory("auto", x.device)
        prep = be.prepare(x[None].contiguous(), float(lamb), False, True)  # also gives each row's max and min
        if fast is None:
            extremes = red.max_(torch.stack([prep.rowmax.max().double(), -prep.rowmin.min()]).cpu())
            fast = lamb * float(extremes.sum()) <= FAST_SPREAD
        if fast:
            return _direct(be, prep, lamb, n_iter, red).to(scores.dtype)
        del prep
    k = x.shape[1]
    log_v1 = -math.log(k) - red.logsumexp_(torch.logsumexp(lamb * x, dim=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot be balanced")  # per-batch use: B < K is normal
        res = sinkhorn_knopp(x, lamb=lamb, tol=0, max_iter=n_iter, init=log_v1, process_group=group)
    return res.plan(normalize_rows=True).to(scores.dtype)


def _extremes(x: torch.Tensor, red: Reducer) -> tuple[float, float, float]:
    """(max x, -min x, largest x.numel()) over every rank: one all-reduce and one host sync."""
    lo, hi = torch.aminmax(x)
    entries = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    top, neg_min, most = red.max_(torch.stack([hi.double(), -lo.double(), entries])).tolist()
    return top, neg_min, most


def _direct_small(x: torch.Tensor, lamb: float, n_iter: int, red: Reducer,
                  top: float | None = None) -> torch.Tensor | None:
    """``_direct``'s iterates in about as many plain torch ops as the peers' loop, or None where the spread
    is too wide for the scaling form (checked here unless the global maximum ``top`` comes with it, from a
    spread already checked). Below ``FAST_SPREAD`` the kernel can be shifted by the global maximum alone:
    its entries stay above e^-40."""
    if top is None:
        top, neg_min, _ = _extremes(x, red)
        if not lamb * (top + neg_min) <= FAST_SPREAD:  # also NaN and infinite scores
            return None
    E = x.sub(top).mul_(lamb).exp_()
    v = red.sum_(E.sum(0)).reciprocal_()  # the first cluster normalisation (the sample weights are equal)
    for _ in range(n_iter - 1):
        v = red.sum_((E @ v).reciprocal_() @ E).reciprocal_()
    q = E.mul_(v)
    return q.div_(q.sum(1, keepdim=True))


def _direct(be, prep, lamb: float, n_iter: int, red: Reducer) -> torch.Tensor:
    """The peers' iterates on E = exp(lamb (x - rowmax)) with the fused passes (safe spread only)."""
    E, m = prep.mat, prep.rowmax[0]
    # first cluster normalisation of exp(lamb x) = E_ij exp(lamb m_i): row weights exp(lamb (m_i - max m))
    top = red.max_(m.max().reshape(1))
    v = 1.0 / red.sum_(be.column_sums(E, torch.exp(lamb * (m - top))[None]))
    ones = torch.ones(E.shape[1], dtype=E.dtype, device=E.device)
    u = ones[None].clone()
    for _ in range(n_iter - 1):  # sample then cluster normalisation, fused: one read of E
        w, _ = be.scaling_pass(E, ones, u, v)
        v = 1.0 / red.sum_(w)
    return be.normalised_rows(E, v)[0]  # the last sample normalisation
