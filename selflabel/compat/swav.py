"""Drop-in for SwAV's ``distributed_sinkhorn``.

    # from main_swav import distributed_sinkhorn
    from selflabel.compat.swav import distributed_sinkhorn
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from . import balanced_assignments

DEFAULTS = {"epsilon": 0.05, "sinkhorn_iterations": 3}  # SwAV's command-line defaults


def _setting(name: str, given: Any, args: Any, caller_globals: dict) -> Any:
    """``given``, else ``args.<name>``, else the caller module's global ``args`` (where SwAV's
    main_swav.py keeps its parsed options), else SwAV's default with a warning."""
    if given is not None:
        return given
    for namespace in (args, caller_globals.get("args")):
        if namespace is not None and hasattr(namespace, name):
            return getattr(namespace, name)
    warnings.warn(f"distributed_sinkhorn: no {name} given and no `args` with one found; using SwAV's default "
                  f"{DEFAULTS[name]} (pass {name}=... or args=your_options)", UserWarning, stacklevel=3)
    return DEFAULTS[name]


def distributed_sinkhorn(out: torch.Tensor, epsilon: float | None = None, sinkhorn_iterations: int | None = None,
                         args: Any = None) -> torch.Tensor:
    """Codes for a batch: ``out`` (B, K) prototype scores -> Q (B, K), each row summing to 1,
    in ``out``'s dtype.

    Equal to SwAV's function (``Q = exp(out / epsilon)``, normalised by its total, then
    ``sinkhorn_iterations`` rounds of cluster and sample normalisation, all-reduced across
    ranks when torch.distributed is initialised), without its overflow for small epsilon.
    Like SwAV's, it reads ``epsilon`` and ``sinkhorn_iterations`` from ``args`` when they are
    not given: the ``args`` argument, or else the global ``args`` of the calling module (so
    a call ``distributed_sinkhorn(out)`` inside SwAV's main_swav.py uses its options).
    """
    caller = sys._getframe(1).f_globals  # the module that called us (no decorator frame in between)
    epsilon = _setting("epsilon", epsilon, args, caller)
    iterations = _setting("sinkhorn_iterations", sinkhorn_iterations, args, caller)
    with torch.no_grad():
        return balanced_assignments(out, 1.0 / float(epsilon), int(iterations))
