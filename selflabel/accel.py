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
the row update of a pass that ends at a check runs plain, so the reported error is that of
a row-exact plan, as without acceleration. The C++ and Triton passes apply the same rule per row
(``relaxed_step`` in csrc/kernels.h and kernels/_common.py).
"""

from __future__ import annotations

import math

import torch

ACCELERATIONS = ("auto", "none", "overrelax")
OMEGA_MAX = 1.99  # omega -> 2 is the stability limit; the safeguard keeps any omega < 2 convergent
PLATEAU = 0.999  # a window whose error fell by less than this factor teaches nothing
LAM_MAX = 1.0 - 1e-6  # the largest contraction rate an estimate may reach
LEAD = 0.5  # omega is set for a plain rate with this share of the estimate's 1 - lam (see Relaxation)
STEP_DOWN = 2.0  # past its optimum, omega steps down to a plain rate with this many times the 1 - lam


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


def young_lam(log_fall: float, relaxed: float, plain: float, omega: float) -> float | None:
    """The plain rate ``lam`` of a window whose error changed by ``exp(log_fall)`` over ``relaxed``
    passes at ``omega`` (rate ``r`` each, ``(r + omega - 1)^2 = lam omega^2 r``) and ``plain``
    passes at omega 1 (rate ``lam`` each; ``plain`` > 0 where ``relaxed`` is 0); None when the
    window fell at least as fast as omega's optimum allows (``r <= omega - 1``: omega is at or
    past its optimum)."""
    c = omega - 1.0

    def lam_of(r: float) -> float:
        return (r + c) ** 2 / (r * omega * omega)

    def fall(r: float) -> float:  # increasing in r on (c, 1]
        return relaxed * math.log(r) + plain * math.log(lam_of(r))

    if relaxed <= 0:  # every half-step of the window ran plain: it measured lam itself
        return math.exp(log_fall / plain)
    if fall(c) >= log_fall:
        return None
    lo, hi = c, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fall(mid) < log_fall else (lo, mid)
    return lam_of(hi)


class Relaxation:
    """The relaxation factor of each half-step, adapted at the solver's checks.

    At every check the solver reports the marginal error; between two checks the error
    fell by some factor. With plain passes (omega = 1) its rate per iteration estimates the
    plain rate ``lam`` directly. With relaxed passes ``lam`` follows from Young's relation
    for successive over-relaxation, ``(r + omega - 1)^2 = lam * omega^2 * r`` for the
    relaxed rate ``r``, valid while ``r > omega - 1``; the half-steps that ran plain in the
    window (those around a check) count at rate ``lam`` (``young_lam``).

    Sinkhorn's local rate rises as the iterate nears the solution, so every estimate lags
    the rate the next window meets, and running under omega's optimum costs far more than
    running over it by as much (below it the rate climbs toward 1 like a square root, above
    it the rate is ``omega - 1``): omega is set for a rate whose ``1 - lam`` is ``LEAD``
    times the estimate's. The first plain window sets omega at once; after it an estimate is
    taken whole only when two successive windows agree on ``1 - lam`` within a quarter, since
    the plateaus of sharp small problems fall at rates that say nothing of the asymptotic
    one, and a single window may raise ``lam`` so far that ``1 - lam`` shrinks at most
    fourfold. Windows whose error fell by less than 0.1% are skipped. A window that fell at
    least as fast as omega's optimum allows says omega is at or past it (where the rate is
    ``omega - 1`` whatever ``lam``): omega steps down (``1 - lam`` times ``STEP_DOWN``)
    until a window measures ``lam`` again, since an omega far above its optimum is slow, and the
    estimate that proved too high becomes a ceiling the lead does not pass again (an estimate
    above it is still taken, without lead), so on a steady rate omega settles on its optimum.
    Over-relaxation does not make the error monotone (the dual objective is): a check whose
    error grew halves ``omega - 1`` until two windows agree again.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.omega_now = 1.0
        self.lam = 0.0
        self.last: tuple[int, float] | None = None  # (iteration, error) at the previous check
        self.pending: float | None = None  # the previous window's estimate of lam
        self.ceiling = 1.0  # the leading stops here: a plain rate whose lead proved past omega's optimum
        self.plain = 0.0  # passes of the current window run plain although omega_now > 1 (halves count half)

    def omega(self, plain: bool) -> float:
        """The factor of the next half-step (a row or a column update): 1 where ``plain``."""
        if not self.enabled:
            return 1.0
        if plain:
            self.plain += 0.5 * (self.omega_now > 1.0)
            return 1.0
        return self.omega_now

    def observe(self, k: int, error: float) -> None:
        """Take the marginal error measured at iteration ``k``."""
        if not self.enabled or not math.isfinite(error):
            return
        last, self.last = self.last, (k, error)
        plain, self.plain = self.plain, 0.0
        if last is None or k <= last[0] or last[1] <= 0 or error <= 0:
            return
        if error >= last[1]:  # the error grew (over-relaxation is not monotone in it): back off for now
            self.omega_now, self.pending = 1.0 + 0.5 * (self.omega_now - 1.0), None
            return
        if error > PLATEAU * last[1]:  # a plateau says nothing of the asymptotic rate
            self.pending = None
            return
        w = self.omega_now
        if w == 1.0:
            estimate = (error / last[1]) ** (1.0 / (k - last[0]))
        else:
            plain = min(plain, k - last[0])  # (passes rewound after an overflow counted too)
            estimate = young_lam(math.log(error / last[1]), k - last[0] - plain, plain, w)
        if estimate is None:  # omega at or past its optimum: step down until a window measures lam again
            self.pending = None
            self.ceiling = min(self.ceiling, self.lam)
            self.lam = max(0.0, 1.0 - STEP_DOWN * (1.0 - self.lam))
            self._set()
            return
        previous, self.pending = self.pending, estimate
        first = self.lam == 0.0 and w == 1.0
        agree = previous is not None and abs(estimate - previous) <= 0.25 * (1.0 - min(estimate, previous))
        if first or agree:
            self.lam = estimate if first else min(estimate, previous)
        elif estimate > self.lam:  # one window may raise the estimate: 1 - lam shrinks at most fourfold
            self.lam = min(estimate, 1.0 - 0.25 * (1.0 - self.lam))
        else:
            return
        self._set()

    def _set(self) -> None:
        """omega for the estimate ``lam``, led ahead of it up to the ceiling."""
        self.omega_now = optimal_omega(max(self.lam, min(1.0 - LEAD * (1.0 - self.lam), self.ceiling)))
