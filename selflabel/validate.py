"""Every check of the solver's input and options, done once before any pass: scores (tensors,
arrays, ``.npy`` paths, lists of heads), dtype, marginals, warm starts and the prepared kernel's rows
and columns. Each failure names the argument and the fix."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .accel import ACCELERATIONS
from .distributed import Reducer
from .result import SinkhornResult
from .source import check_float_dtype, parse_bytes

KINDS = ("logits", "log_probs", "probs")
ALGORITHMS = ("auto", "scaling", "log")
CRITERIA = ("marginal", "sela")
DEFAULT_TOL = {"marginal": 1e-5, "sela": 0.1}
PROBS_SUM_TOL = 1e-3  # |sum_j P_ij - 1| allowed for kind="probs"
MARGINAL_SUM_TOL = 1e-4  # marginals off by more than this are normalised with a warning


def as_tensor(scores: Any, name: str = "scores") -> torch.Tensor:
    if isinstance(scores, (str, os.PathLike)):
        path = os.fspath(scores)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{name}: {path!r} is a directory; pass a .npy file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no such file {path!r}")
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(scores, np.ndarray):
        check_float_dtype(scores.dtype, name)
        if any(st < 0 for st in scores.strides):  # torch cannot view negative strides: copy
            scores = np.ascontiguousarray(scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: we never write to them
            return torch.from_numpy(scores)
    if isinstance(scores, torch.Tensor):
        check_float_dtype(scores.dtype, name)
        return scores.detach()
    if isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)) and len(scores) > 0:
        heads = [as_tensor(s, f"{name}[{i}]") for i, s in enumerate(scores)]
        shapes = {tuple(h.shape) for h in heads}
        if len(shapes) != 1 or heads[0].dim() != 2:
            raise ValueError(f"{name}: a list of heads must hold (N, K) matrices of one shape, got {sorted(shapes)}")
        return torch.stack(heads)
    raise TypeError(f"{name} must be a torch.Tensor, numpy array, .npy path or list of heads, "
                    f"got {type(scores).__name__}")


def compute_dtype(dtype: Any, scores: torch.Tensor) -> torch.dtype:
    if dtype is None:
        return torch.float64 if scores.dtype == torch.float64 else torch.float32
    aliases = {"float32": torch.float32, "f32": torch.float32, "float": torch.float32,
               "float64": torch.float64, "f64": torch.float64, "double": torch.float64,
               torch.float32: torch.float32, torch.float64: torch.float64,
               np.float32: torch.float32, np.float64: torch.float64}
    try:
        return aliases[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be float32 or float64 (or None to follow the scores), got {dtype!r}") from None


def check_marginal(x: Any, n: int, name: str, length_name: str, device: torch.device) -> torch.Tensor | None:
    """Validate a marginal; float64, not yet normalised (None: uniform)."""
    if x is None:
        return None
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, device=device)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be numeric, got {t.dtype}")
    t = t.detach().to(torch.float64)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have shape ({n},) to match {length_name}={n}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (t <= 0).any():
        bad = int((t <= 0).nonzero()[0])
        raise ValueError(f"{name} must be strictly positive (entry {bad} is {float(t[bad])}); "
                         "drop zero-mass rows/clusters instead")
    return t


def normalise(t: torch.Tensor, name: str, reducer: Reducer | None = None) -> torch.Tensor:
    """``t`` (float64) divided by its total (across ranks with a reducer), warning if that was off 1."""
    total_t = t.sum().reshape(1)
    total = float((reducer.sum_(total_t) if reducer is not None else total_t)[0])
    if abs(total - 1.0) > MARGINAL_SUM_TOL:
        warnings.warn(f"{name} sums to {total:.6g}, not 1; normalising it", UserWarning, stacklevel=4)
    return t / total


def budget_bytes(memory_budget: int | str | None, device: torch.device) -> int:
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def real_number(x: Any, name: str, hint: str) -> float:
    """A finite real number (Python, numpy or 0-d tensor), else ValueError naming ``name``."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool:
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be {hint}, got {x!r}")
    return float(x)


def positive_int(x: Any, name: str) -> int:
    """A positive integer (Python, numpy or 0-d integer tensor), else ValueError naming ``name``."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_floating_point and x.dtype != torch.bool:
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or int(x) < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def check_options(lamb, kind, algorithm, criterion, acceleration, tol, max_iter,
                   check_every) -> tuple[float, float, int, int]:
    """Validated (lamb, tol, max_iter, check_every) as Python numbers."""
    lamb = real_number(lamb, "lamb", "a positive finite number (SeLa uses 25)")
    if lamb <= 0:
        raise ValueError(f"lamb must be a positive finite number (SeLa uses 25), got {lamb!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    max_iter = positive_int(max_iter, "max_iter")
    check_every = positive_int(check_every, "check_every")
    hint = "a finite number >= 0 (0 runs exactly max_iter iterations)"
    tol = DEFAULT_TOL[criterion] if tol is None else real_number(tol, "tol", hint)
    if tol < 0:
        raise ValueError(f"tol must be {hint}, got {tol!r}")
    return lamb, tol, max_iter, check_every


def probs_sum_tol(dtype: torch.dtype) -> float:
    """How far from 1 a row of probabilities stored in ``dtype`` may sum: 1e-3, or two
    machine epsilons of a coarser storage dtype (bfloat16 rounds each entry by up to 2**-9)."""
    return max(PROBS_SUM_TOL, 2 * torch.finfo(dtype).eps)


def validate_prepared(prep, probs: bool, storage: torch.dtype, raw: torch.Tensor | None = None) -> None:
    """Raise on rows the solver cannot use. Logits may hold -inf (no mass) but not NaN or +inf."""
    bad = torch.isnan(prep.rowsum) | torch.isnan(prep.rowmax) | (prep.rowmax == math.inf)
    if probs:
        bad |= torch.isinf(prep.rowsum)
    if bad.any():
        h, i = (int(x) for x in bad.nonzero()[0])
        if raw is not None and raw.dtype != prep.rowmax.dtype and bool(torch.isfinite(raw[h, i]).all()):
            big = float(raw[h, i].abs().max())
            raise ValueError(f"scores: row {i} (head {h}) holds {big:.4g}, beyond the range of "
                             f"{prep.rowmax.dtype}; pass dtype=torch.float64 or rescale the scores")
        raise ValueError(f"scores contain NaN or +inf (row {i}, head {h}); clean the network outputs first "
                         "(-inf logits and zero probabilities are fine: they mean no mass)")
    if probs:
        if (prep.rowmin < 0).any():
            h, i = (int(x) for x in (prep.rowmin < 0).nonzero()[0])
            raise ValueError(f"scores: kind='probs' needs non-negative probabilities; row {i} (head {h}) has "
                             f"{float(prep.rowmin[h, i]):.4g}; pass kind='logits' for raw network outputs")
        tol = probs_sum_tol(storage)
        off = (prep.rowsum - 1).abs() > tol
        if off.any():
            h, i = (int(x) for x in off.nonzero()[0])
            raise ValueError(f"scores: kind='probs' needs rows summing to 1 (tolerance {tol:.3g} for {storage}); "
                             f"row {i} (head {h}) sums to {float(prep.rowsum[h, i]):.6g}; apply softmax or use "
                             "kind='logits'")
    else:
        empty = prep.rowmax == -math.inf
        if empty.any():
            h, i = (int(x) for x in empty.nonzero()[0])
            raise ValueError(f"scores: row {i} (head {h}) is -inf for every cluster, so that sample has no mass and "
                             "no balanced assignment exists; drop that row")


def check_columns(colmax: torch.Tensor) -> None:
    dead = torch.isinf(colmax)
    if dead.any():
        h, j = (int(x) for x in dead.nonzero()[0])
        raise ValueError(f"scores: cluster {j} (head {h}) receives no mass from any sample (its score is -inf, "
                         "probability 0, or too far below every row's maximum to be represented), so no balanced "
                         "assignment exists; drop that cluster")


def init_log_v(init: Any, H: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if init is None:
        return None
    log_v = init.log_v if isinstance(init, SinkhornResult) else torch.as_tensor(init)
    log_v = log_v.detach().to(device=device, dtype=dtype)
    if log_v.dim() == 1:
        log_v = log_v.expand(H, -1)
    if tuple(log_v.shape) != (H, K):
        raise ValueError(f"init must be a SinkhornResult or log_v of shape ({K},) or ({H}, {K}), "
                         f"got shape {tuple(log_v.shape)}")
    if not torch.isfinite(log_v).all():
        raise ValueError("init contains NaN or inf potentials")
    return log_v - log_v.amax(-1, keepdim=True)  # potentials are defined up to a constant


def linear_marginal_ok(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a marginal (float64) keeps full precision in ``dtype`` in the scaling form."""
    info = torch.finfo(dtype)
    return float(x.min()) >= info.tiny / info.eps


def log_marginal(x: torch.Tensor | None, n: int, total: int, dtype: torch.dtype, device: torch.device):
    """(linear, log) marginal in ``dtype``: the log is taken in float64, so every strictly
    positive entry has a finite log (the linear form may underflow: then the scaling
    form is not used)."""
    x64 = torch.full((n,), 1.0 / total, dtype=torch.float64, device=device) if x is None else x
    return x64, x64.to(dtype), torch.log(x64).to(dtype)


class Marginals(NamedTuple):
    """The marginals of one solve, normalised: float64, and linear and log in the compute dtype."""

    a64: torch.Tensor  # (N,) float64, this rank's rows
    a: torch.Tensor  # (N,)
    log_a: torch.Tensor  # (N,)
    b64: torch.Tensor  # (K,) float64
    b: torch.Tensor  # (H, K)
    log_b: torch.Tensor  # (H, K)


def marginals(a_raw: torch.Tensor | None, b_raw: torch.Tensor | None, shape: tuple[int, int, int], n_total: int,
              dtype: torch.dtype, device: torch.device, reducer: Reducer) -> Marginals:
    """Checked marginals (None: uniform) normalised, the row marginal over every rank's rows."""
    H, N, K = shape
    if a_raw is not None:
        a_raw = normalise(a_raw, "row_marginal", reducer)
    if b_raw is not None:
        b_raw = normalise(b_raw, "col_marginal")
    a64, a, log_a = log_marginal(a_raw, N, n_total, dtype, device)
    b64, b, log_b = log_marginal(b_raw, K, K, dtype, device)
    return Marginals(a64, a, log_a, b64, b.expand(H, K), log_b.expand(H, K))
