"""The iteration loop and its policies: stopping, over-relaxation, the start form and the switch
between the scaling and log forms. The front (``selflabel.solver``) checks the input and builds
the result; backends run single passes.

One iteration, scaling form (M = exp(lamb*(S - rowmax)), one read of M)::

    u = a / (M v)            w = M^T u            v = b / w

The column mass of the plan (u, v) before the v update is ``v * w``, so the marginal error of a
row-exact plan comes out of every pass for free; the solver returns that plan (rows exact,
columns within ``tol``). The log form does the same with potentials f = log u, g = log v and
log-sum-exps (csrc/kernels.h, kernels/logdomain.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .accel import Relaxation, relaxed_step
from .backends import Backend, Prepared
from .distributed import Reducer
from .validate import Marginals, linear_marginal_ok

# The scaling form is taken only if every column keeps entries above exp(-T):
# then v stays within exp(T) and products u*M*v stay in range.
SCALING_SAFE_LOG = {torch.float32: 0.5 * math.log(torch.finfo(torch.float32).max),
                    torch.float64: 0.5 * math.log(torch.finfo(torch.float64).max)}
# Stabilised scaling (backends that absorb potentials): column scalings are kept within e^+-ABSORB_LOG
# of the absorbed kernel, whose rows have a maximum of 1, so products u * M * v stay far inside the range.
ABSORB_LOG = {torch.float32: 30.0, torch.float64: 300.0}


class Loop:
    """The convergence loop shared by both algorithms, and the cross-rank failure protocol:
    a rank whose local work raises still joins the next collective with a failure flag, so
    every rank raises together instead of waiting for it."""

    def __init__(self, backend: Backend, reducer: Reducer, tol: float, max_iter: int, check_every: int,
                 criterion: str, bar: tqdm, relax: Relaxation) -> None:
        self.be, self.red, self.tol, self.max_iter, self.check_every = backend, reducer, tol, max_iter, check_every
        self.criterion, self.bar, self.relax = criterion, bar, relax
        self.history: list[tuple[int, float]] = []
        self.k = 0
        self.error = math.inf
        self.converged = False

    def due(self, k: int | None = None) -> bool:
        """Whether iteration ``k`` (default: the current one) ends at a check."""
        k = self.k if k is None else k
        if k == self.max_iter:
            return True
        if self.criterion == "sela":  # SeLa checks at its counters 0, 10, 20, ... (iterations 1, 11, ...)
            return k > 1 and (k - 1) % self.check_every == 0
        return k % self.check_every == 0

    def row_omega(self) -> float:
        """The relaxation factor of the current pass's row update: plain for a pass ending at a
        check, whose error must be that of a row-exact plan."""
        return self.relax.omega(self.due())

    def col_omega(self) -> float:
        """The relaxation factor of the column update after the current pass (asked after its check,
        so a new omega applies at once): plain with SeLa's rule in front of a check pass, so the rule
        measures one plain iteration's change of the row scalings."""
        return self.relax.omega(self.criterion == "sela" and self.due(self.k + 1))

    def local(self, fn, *args):
        """``fn(*args)`` and None, or (with a process group) None and the exception it raised."""
        if not self.red.active:
            return fn(*args), None
        try:
            return fn(*args), None
        except Exception as exc:  # raised on every rank by the next checked collective
            return None, exc

    def record(self, colmass: torch.Tensor, b: torch.Tensor, change: torch.Tensor) -> bool:
        """Record a check; return True when the loop must stop."""
        err = (colmass.double() - b.double()).abs().sum(-1)
        crit = self.red.sum_(change.clone()) if self.criterion == "sela" else err
        stats = torch.stack([err.max(), crit.max()]).cpu()  # the one host sync per check
        self.error, value = float(stats[0]), float(stats[1])
        self.history.append((self.k, value))
        self.relax.observe(self.k, self.error)
        self.bar.n = self.k
        self.bar.set_postfix(err=f"{self.error:.2e}")  # refreshes
        self.converged = self.tol > 0 and value <= self.tol
        return self.converged or self.k >= self.max_iter


def flush_margin(tol: float, criterion: str, K: int) -> float:
    """log of the plan mass that kernel entries lost to the dtype's range may carry before the
    scaling form's answer must be checked exactly: small against tol and against one row's
    share of its best cluster (so labels cannot change either)."""
    share = 0.1 / K
    return math.log(min(share, 0.01 * tol) if criterion == "marginal" and tol > 0 else min(share, 1e-7))


class Scaled(NamedTuple):
    """Where a run of scaling iterations stopped. Duals are totals (absorbed potentials included)."""

    log_u: torch.Tensor | None  # (H, N) row duals of the plan checked last (None: no good check yet)
    log_v: torch.Tensor  # (H, K) the column duals that plan was measured with
    resume: torch.Tensor  # (H, K) the column duals to go on from (the next iteration's)
    status: str  # "ended" (converged or max_iter), "overflow", "tripped" or "drifted"
    lost: float  # log of the bound on the plan mass of flushed kernel entries, at the last check


@contextlib.contextmanager
def one_thread(x: torch.Tensor):
    """torch on one thread for the O(K) column update of a CPU iteration. torch's log and exp on
    CPU go to MKL's vector math, which opens an OpenMP region even for a few hundred entries; with
    torch's default wait policy its idle thread then spins between iterations on the cores that
    the passes' helpers need, and on a busy machine two threads ran several times slower than one.
    The values do not depend on the thread count."""
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_scaling(loop: Loop, M, a, log_a, b, start, trip: float, n_total: int, absorbed=None,
                 drift: float = math.inf) -> Scaled:
    """Scaling iterations on M = exp(log kernel + f_i + g_j) with ``absorbed`` = (f, g) potentials
    (None: none), from column scalings exp(``start``) (None: ones), until the loop ends
    ("ended"), a check finds non-finite or zero scalings ("overflow": the duals are the last good
    check's, loop.k its iteration), the bound on the mass of flushed kernel entries passes
    ``trip`` (log) at a check ("tripped"), or the next column scalings leave [e^-drift, e^drift]
    ("drifted": absorb them and go on)."""
    H, N, K = M.shape
    f_abs, g_abs = absorbed if absorbed is not None else (0.0, 0.0)
    u = a.repeat(H, 1)
    log_v = torch.zeros(H, K, dtype=M.dtype, device=M.device) if start is None else start
    v = torch.exp(log_v)  # may underflow to 0: then the first check fails and the log form starts from start
    # Entries of M below the smallest normal number are flushed to 0 (or lose precision): each is at
    # most exp(floor), so with the plan (u, v) they carry at most exp(floor) * u_i * sum_j v_j of row i,
    # a share exp(floor) * (u_i / a_i) * sum_j v_j of it. Every rank computes the same bound.
    floor = math.log(torch.finfo(M.dtype).tiny)
    good, good_k = Scaled(None, g_abs + log_v, g_abs + log_v, "overflow", -math.inf), loop.k
    while loop.k < loop.max_iter:
        loop.k += 1
        out, err = loop.local(loop.be.scaling_pass, M, a, u, v, loop.row_omega())
        w, change = out if err is None else (torch.zeros(H, K, dtype=M.dtype, device=M.device), None)
        loop.red.sum_checked_(w, err)
        if loop.due():
            finite = torch.isfinite(w).all() & (w > 0).all() & torch.isfinite(u).all() & (u > 0).all()
            finite &= torch.isfinite(v).all() & (v > 0).all()
            row_ratio = (torch.log(u) - log_a).amax(-1)  # max_i log(u_i / a_i) per head
            stats = loop.red.max_(torch.cat([(~finite).to(torch.float64).reshape(1), row_ratio.double()])).cpu()
            if float(stats[0]) > 0:
                loop.k = good_k
                return good._replace(status="overflow")
            # plus products below the normal range flushed inside the passes: at most exp(floor) each,
            # K of them per row sum (a share exp(floor) K u_i / a_i of row i) and N per column sum
            log_v_sum = torch.logsumexp(torch.log(v.double()), -1).cpu()
            rows = stats[1:] + torch.logaddexp(log_v_sum, torch.full_like(log_v_sum, math.log(K)))
            lost = float(torch.logaddexp(rows, log_v_sum + math.log(n_total)).max()) + floor
            ended = loop.record(v * w, b, change)
            log_next = torch.log(b / w)
            good = Scaled(f_abs + torch.log(u), g_abs + log_v, g_abs + log_next, "ended", lost)
            good_k = loop.k
            if ended:
                return good
            if float(log_next.abs().max()) > drift:  # absorbing first may settle the bound too
                return good._replace(status="drifted")
            if lost > trip:
                return good._replace(status="tripped")
        col_omega = loop.col_omega()
        with one_thread(w):
            if col_omega == 1.0:
                v = b / w
                log_v = torch.log(v)
            else:  # over-relaxed: log v += omega * log(b / column mass), where that still gains
                log_v = log_v + relaxed_step(torch.log(b / (v * w)), col_omega)
                v = torch.exp(log_v)
    return Scaled(f_abs + torch.log(u), g_abs + log_v, g_abs + log_v, "ended", good.lost)


def run_log(loop: Loop, L, log_a, log_b, log_v0, log_u0=None, *, certify: bool = False):
    """Log-domain iterations. ``certify``: a single pass from ``log_v0`` whose check is the exact
    error of the returned duals (it does not count as an iteration)."""
    H, K = log_b.shape
    f = log_a.repeat(H, 1) if log_u0 is None else log_u0.clone()  # f only feeds the SeLa change
    g = torch.zeros(H, K, dtype=log_b.dtype, device=log_b.device) if log_v0 is None else log_v0.clone()
    while certify or loop.k < loop.max_iter:
        loop.k += not certify
        out, err = loop.local(loop.be.log_pass, L, log_a, f, g, 1.0 if certify else loop.row_omega())
        if err is not None:
            logw, change = torch.full((H, K), -math.inf, dtype=log_b.dtype, device=log_b.device), None
        else:
            logw, change = out
        logw = loop.red.logsumexp_checked_(logw, err)
        if certify or loop.due():
            bad = ~(torch.isfinite(logw).all() & torch.isfinite(f).all())
            if bool(loop.red.max_(bad.to(torch.float64).reshape(1))[0] > 0):
                raise FloatingPointError(
                    f"log-domain Sinkhorn produced non-finite potentials at iteration {loop.k}; "
                    "this is a bug, please report it with the scores' shape and lamb")
            if loop.record(torch.exp(logw.double()), torch.exp(log_b.double()), change) or certify:
                break
        g = g + relaxed_step(log_b - logw, loop.col_omega())
    return f, g


class Kernel:
    """The kernel matrix of one solve as its backend prepared it: the log kernel lamb*(x - rowmax),
    or the scaling kernel (its exp), with column potentials absorbed or not; rebuilt only when a
    pass needs another form (the old one is freed first)."""

    def __init__(self, backend: Backend, scores: Any, lamb: float, probs: bool, log: bool) -> None:
        self.be, self.scores, self.lamb, self.probs = backend, scores, lamb, probs
        self.is_log, self.absorbed_g = log, None  # what ``prep.mat`` holds
        self.prep: Prepared | None = backend.prepare(scores, lamb, probs, exponentiate=not log)

    def get(self, log: bool, col_pot: torch.Tensor | None = None):
        """The log kernel, or the scaling kernel with ``col_pot`` (H, K) absorbed (None: none)."""
        if self.is_log != log or (not log and col_pot is not self.absorbed_g):
            self.prep = None  # free the other kernel first
            if log or col_pot is None:
                self.prep = self.be.prepare(self.scores, self.lamb, self.probs, exponentiate=not log)
            else:
                self.prep = self.be.prepare(self.scores, self.lamb, self.probs, exponentiate=True, col_pot=col_pot)
            self.is_log, self.absorbed_g = log, None if log else col_pot
        return self.prep.mat

    def log_operand(self):
        """The log kernel for an exact pass: a view of the scores where the backend recomputes
        kernel rows itself (no new matrix), else the prepared log kernel."""
        view = None if self.is_log else self.be.log_view(self.prep, self.scores, self.lamb, self.probs)
        return view if view is not None else self.get(log=True)

    def label_operands(self, log: bool, log_v: torch.Tensor):
        """(kernel, column potentials) for the label pass of duals exact in the log or scaling form:
        the scaling kernel carries its absorbed column potentials."""
        if log:
            return self.log_operand(), log_v
        return self.prep.mat, log_v if self.absorbed_g is None else log_v - self.absorbed_g


def starting_form(algorithm: str, kernel: Kernel, colmax: torch.Tensor, m: Marginals, red: Reducer) -> str:
    """"scaling" or "log": the form the solve starts in. The scaling form needs marginals within the
    dtype's normal range and, unless the backend absorbs column potentials, an entry within
    ``SCALING_SAFE_LOG`` in every column; otherwise "auto" starts in the log form (the kernel is
    rebuilt) and "scaling" raises on weak marginals (dying columns overflow, and raise, later)."""
    if kernel.is_log:
        return "log"
    cdtype = m.a.dtype
    weak = [name for name, x in (("row_marginal", m.a64), ("col_marginal", m.b64)) if not linear_marginal_ok(x, cdtype)]
    any_weak = bool(red.max_(torch.tensor([float(bool(weak))], dtype=torch.float64))[0] > 0)
    dying = not kernel.be.absorbs and float(colmax.min()) < -SCALING_SAFE_LOG[cdtype]
    if any_weak and algorithm == "scaling":
        raise ValueError(f"{' and '.join(weak) or 'another rank'}: entries this small lose their precision "
                         f"in the scaling form in {cdtype}; use algorithm='log' or 'auto', or dtype=torch.float64")
    if (any_weak or dying) and algorithm == "auto":
        kernel.get(log=True)
        return "log"
    return "scaling"


class Solved(NamedTuple):
    form: str  # "scaling" or "log": the form the returned duals are exact in
    log_u: torch.Tensor  # (H, N)
    log_v: torch.Tensor  # (H, K)
    switched_at: int | None  # the iteration "auto" went on in the log form from, if it did


def solve(loop: Loop, kernel: Kernel, m: Marginals, log_v0: torch.Tensor | None, colmax: torch.Tensor, form: str,
          algorithm: str, n_total: int) -> Solved:
    """Iterate from ``form`` to the loop's end: scaling iterations first where ``form`` is "scaling"
    (which may hand over to the log form), then log iterations where needed."""
    switched_at, log_u0 = None, None
    if form == "scaling":
        form, log_u, log_v, switch = _scaling(loop, kernel, m, log_v0, colmax, algorithm, n_total)
        if switch is None:
            return Solved(form, log_u, log_v, None)
        switched_at, log_u0, log_v0 = switch
    log_u, log_v = run_log(loop, kernel.get(log=True), m.log_a, m.log_b, log_v0, log_u0)
    return Solved("log", log_u, log_v, switched_at)


def _scaling(loop: Loop, kernel: Kernel, m: Marginals, log_v0, colmax, algorithm: str, n_total: int):
    """Scaling iterations (stabilised where the backend absorbs potentials) to the loop's end, with
    an exact log-domain check wherever kernel entries flushed below the dtype's range may carry plan
    mass. Returns (form, log_u, log_v, switch): ``switch`` = (iteration, log_u, log_v) for the log
    form to go on from ("auto" only: "scaling" raises), or None."""
    tol, criterion, K, cdtype = loop.tol, loop.criterion, m.b.shape[-1], m.a.dtype
    margin = flush_margin(tol, criterion, K)
    keep_scaling = 0.25 * tol if criterion == "marginal" and tol > 0 else 1e-6  # row mass missed
    trip, target = (margin if algorithm == "auto" else math.inf), tol
    # Stabilised scaling: column potentials that would leave the dtype's comfortable range are
    # absorbed into the kernel (exp(L + f + g), rows of maximum 1) and the scalings restart at 1.
    absorbs = kernel.be.absorbs
    drift = ABSORB_LOG[cdtype] if absorbs else math.inf
    g_abs, start, form = None, log_v0, "scaling"
    if absorbs:
        total = torch.zeros(m.log_b.shape, dtype=cdtype, device=m.a.device) if log_v0 is None else log_v0
        lifted = torch.maximum(total, -colmax - ABSORB_LOG[cdtype])  # every column keeps an entry
        if bool((lifted > total).any()) or float(total.min()) < -drift:
            g_abs, start = lifted, total - lifted  # the same iterates, on a kernel whose columns all live
    while True:
        loop.tol = target
        mat = kernel.get(log=False, col_pot=g_abs)
        absorbed = (kernel.prep.row_pot, g_abs) if g_abs is not None else None
        state = run_scaling(loop, mat, m.a, m.log_a, m.b, start, trip, n_total, absorbed, drift)
        loop.tol = tol
        if state.status == "drifted":
            g_abs, start = state.resume, None
            continue
        if state.status == "overflow":
            if algorithm == "scaling":
                raise FloatingPointError(
                    f"the scaling form under/overflowed in {cdtype} after iteration {loop.k} (lamb={kernel.lamb} "
                    "is too sharp for this dtype); use algorithm='log' or 'auto', or dtype=torch.float64")
            return "log", state.log_u, state.log_v, (loop.k, state.log_u, state.resume)
        if state.lost <= margin:  # flushed kernel entries cannot matter: the answer stands
            return form, state.log_u, state.log_v, None
        # Kernel entries below the dtype's range may carry plan mass at these duals: one exact
        # log-domain pass gives the true error of its (row-exact) duals, and the row mass missed.
        claimed, measured = loop.converged, loop.error
        log_u, log_v = run_log(loop, kernel.log_operand(), m.log_a, m.log_b, state.log_v, state.log_u, certify=True)
        # Flushed entries only ever add mass, so exp(log u_scaling - log u_exact) - 1 >= 0 for them;
        # rounding differences between the two passes have either sign and average out.
        missed = float(loop.red.sum_(torch.expm1((state.log_u - log_u).double()) @ m.a64).max())
        if loop.converged or loop.k >= loop.max_iter:
            return "log", log_u, log_v, None  # the duals are the exact pass's
        if missed > keep_scaling:  # the flushed entries matter: the scaling form cannot get there
            if algorithm == "scaling":
                raise FloatingPointError(
                    f"the scaling form reached tol on its {cdtype} kernel, but kernel entries below "
                    f"{cdtype}'s range carry mass at those duals: the exact marginal error is "
                    f"{loop.error:.3g}; use algorithm='log' or 'auto', or dtype=torch.float64")
            return "log", log_u, log_v, (loop.k, log_u, log_v)
        # The scaling form still iterates on (nearly) the exact kernel: go on, checking again once
        # the bound has grown by e^5 and at the end. If it claimed tol but the exact pass measured
        # more (float rounding of two measures), aim lower by the difference.
        start = state.resume if g_abs is None else state.resume - g_abs  # scalings relative to the kernel
        if absorbs and float(start.abs().max()) > drift:
            g_abs, start = state.resume, None
        trip = state.lost + 5.0 if algorithm == "auto" else math.inf
        if claimed:
            target = max(0.5 * tol, target - (loop.error - measured))
