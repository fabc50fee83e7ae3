"""Over-relaxed Sinkhorn-Knopp: fewer iterations to the same fixed point.

Plain Sinkhorn-Knopp replaces each dual coordinate by its exact update, a log step ``y``
(``f_i <- f_i + y_i`` with ``y_i = log(a_i / row mass_i)``, and the same for the columns).
Over-relaxation takes ``omega * y`` instead, ``1 <= omega < 2`` (Thibault, Chizat, Dossal,
Papadakis, "Overrelaxed Sinkhorn-Knopp algorithm for regularized optimal transport", 2021;
Lehmann, von Renesse, Sambale, Uschmajew, "A note on overrelaxation in the Sinkhorn
algorithm", 2021). Near the solution the plain iteration contracts the error by a rate
``lam`` (the second eigenvalue of its linearisation) per iteration; the relaxed one by
about ``omega - 1`` at ``omega = 2 / (1 + sqrt(1 - lam))``, so 1 - lam = 1e-3 takes about
30x fewer iterations.

Safeguard: a coordinate takes the longer step only where it still raises the dual
objective ``<a, f> + <b, g> - sum_ij exp(L_ij + f_i + g_j)`` (``relaxed_step``); elsewhere it
takes the plain step, which always does. So the objective rises at every half-step, the
iteration cannot diverge and its fixed point is plain Sinkhorn-Knopp's.

``omega`` is chosen from the errors the solver measures at its checks (``Relaxation``):
the passes that end at a check run plain, so the reported error is that of a row-exact
plan, as without acceleration. The C++ and Triton passes apply the same rule per row
(``relaxed_step`` in csrc/sinkhorn.cpp and kernels/_common.py).
"""

from __future__ import annotations

import math

import torch

ACCELERATIONS = ("auto", "none", "overrelax")
OMEGA_MAX = 1.99  # omega -> 2 is the stability limit; the safeguard keeps any omega < 2 convergent
PLATEAU = 0.999  # a window whose error fell by less than this factor teaches nothing
LAM_MAX = 1.0 - 1e-6  # the largest contraction rate an estimate may reach


def relaxed_step(y: torch.Tensor, omega: float) -> torch.Tensor:
    """``omega * y`` where the over-relaxed step still raises the dual objective, else ``y``.

    A coordinate of mass r with plain log step y = log(target mass / r) gains
    ``r * (s e^y - e^s + 1)`` from a step s. At s = omega*y that gain is >= 0 for every
    y <= 0 when omega <= 2; for y > 0 it is computed (in float64) and tested.
    """
    if omega == 1.0:
        return y
    y64 = y.double()
    gain = omega * y64 * torch.exp(y64) - torch.exp(omega * y64) + 1.0
    return torch.where((y64 <= 0) | (gain >= 0), omega * y, y)


def optimal_omega(lam: float) -> float:
    """The relaxation factor that minimises the asymptotic rate for plain rate ``lam`` (at most OMEGA_MAX)."""
    return min(OMEGA_MAX, 2.0 / (1.0 + math.sqrt(1.0 - min(max(lam, 0.0), LAM_MAX))))


class Relaxation:
    """The relaxation factor of each pass, adapted at the solver's checks.

    At every check the solver reports the marginal error; between two checks the error
    fell by a rate ``r`` per iteration. With plain passes (omega = 1) ``r`` estimates the
    plain rate ``lam`` directly; with relaxed passes ``lam`` follows from Young's relation
    for successive over-relaxation, ``(r + omega - 1)^2 = lam * omega^2 * r``, valid while
    ``r > omega - 1``. The first plain window sets omega at once (early windows fall faster
    than the asymptotic rate, so that first omega is on the low side, where over-relaxation
    is safe); after it an estimate is taken whole only when two successive windows agree on
    ``1 - lam`` within a quarter, since the plateaus of sharp small problems fall at rates
    that say nothing of the asymptotic one; a single window may raise ``lam`` so far that
    ``1 - lam`` shrinks at most fourfold. Windows whose error fell by less than 0.1% are
    skipped. At or past its optimum omega contracts by ``omega - 1`` whatever ``lam``: then
    omega steps down (1 - lam times 10) until a window measures ``lam`` again, since an omega
    far above its optimum is slow. Over-relaxation does not make the error monotone (the
    dual objective is): a check whose error grew halves ``omega - 1`` until two windows
    agree again.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.omega_now = 1.0
        self.lam = 0.0
        self.last: tuple[int, float] | None = None  # (iteration, error) at the previous check
        self.pending: float | None = None  # the previous window's estimate of lam

    def omega(self, check: bool) -> float:
        """The factor of the next pass; 1 for a pass that ends at a check."""
        return 1.0 if check or not self.enabled else self.omega_now

    def observe(self, k: int, error: float) -> None:
        """Take the marginal error measured at iteration ``k``."""
        if not self.enabled or not math.isfinite(error):
            return
        last, self.last = self.last, (k, error)
        if last is None or k <= last[0] or last[1] <= 0:
            return
        if error >= last[1]:  # the error grew (over-relaxation is not monotone in it): back off for now
            self.omega_now, self.pending = 1.0 + 0.5 * (self.omega_now - 1.0), None
            return
        if error > PLATEAU * last[1]:  # a plateau says nothing of the asymptotic rate
            self.pending = None
            return
        rate = (error / last[1]) ** (1.0 / (k - last[0]))
        w = self.omega_now
        if w == 1.0:
            estimate = rate
        elif rate > w - 1.0:
            estimate = (rate + w - 1.0) ** 2 / (rate * w * w)
        else:  # omega at or past its optimum: step down (1 - lam times 10) until a window measures lam again
            self.pending = None
            self.lam = max(0.0, 1.0 - 10.0 * (1.0 - self.lam))
            self.omega_now = optimal_omega(self.lam)
            return
        previous, self.pending = self.pending, estimate
        first = self.lam == 0.0 and w == 1.0
        agree = previous is not None and abs(estimate - previous) <= 0.25 * (1.0 - min(estimate, previous))
        if first or agree:
            self.lam = estimate if previous is None or first else min(estimate, previous)
        elif estimate > self.lam:  # one window may raise the estimate: 1 - lam shrinks at most fourfold
            self.lam = min(estimate, 1.0 - 0.25 * (1.0 - self.lam))
        else:
            return
        self.omega_now = optimal_omega(self.lam)
