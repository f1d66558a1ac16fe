"""Weighted least squares with exact constraints: ADMM with an exact structured x-step.

Splitting ``min f(X) + I_C1(Z) [+ I_box(W)]`` s.t. ``X = Z`` [and ``G X = W`` for lower
bounds ``G x_c >= l_c`` on one query, and forced-zero answers under held totals]. The x-step
minimises the augmented Lagrangian exactly, including the linear constraints
``sum_c x_c = p`` and ``1'x_c = t_c`` in closed form, because every child shares
``M = H + rho I (+ rho G'G)`` (notes section 3.3): ``v_c = M^-1 r_c``,
``mu = (p - sum_c v_c)/k``, ``alpha_c = (t_c - 1'(v_c + mu))/s``, ``x_c = v_c + mu + alpha_c u``
with ``u = M^-1 1`` and ``s = 1'u``. The z-step is the exact per-cell simplex projection, so
every returned Z meets x >= 0 and the parent sums to rounding error whatever the tolerance;
the loop stops on the certificate of ``certificate.py``.

One loop (:func:`_run`: initial rho :func:`initial_rho`, over-relaxed iterations, a
certificate every ``check_every`` iterations, the stopping rule, the held-totals repair,
certified parents leaving the run, residual balancing :func:`rho_factor`) drives two array
layouts, which do the arithmetic of each step:

- :class:`_One` (:func:`admm`): one parent, ``(k, n)`` arrays reused in place, ``M^-1`` a
  dense (generalised) eigendecomposition on the free cells or the Kronecker inverse on the
  full grid, warm-started projections; with held child totals a check may certify the
  iterate moved onto the totals (:func:`_repair`).
- :class:`_Batch` (:func:`admm_batch`): P small parents padded into ``(P, K, n)`` arrays;
  each parent's ``M_i`` is inverted explicitly (by Cholesky, :func:`spd_inverse`, once per
  change of ``rho_i``), projections are warm-started from the last thresholds,
  each parent keeps its own ``rho`` and leaves the batch when certified (the arrays shrink).

Both use the one certificate of ``certificate.py`` and the column projection of
``projection.py``, and both extrapolate their iterates by :class:`Anderson` acceleration
(the dense x-step and batches; not the Kronecker one, where it did not pay): every point the
loop certifies is still an exact projection, so acceleration changes the path, never what a
certified result means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, cast

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from pipeline.postprocess.certificate import certificate, infeasibility, lower_bound
from pipeline.postprocess.kron import KronInverse
from pipeline.postprocess.objective import L2Result, Objective
from pipeline.postprocess.operators import dense_normal_matrix
from pipeline.postprocess.projection import (
    fit_row_col_offsets,
    fix_row_sums,
    project_columns_sort,
    project_columns_warm,
)

if TYPE_CHECKING:  # solver imports this module
    from pipeline.postprocess.solver import KernelFlags

# attempt the repair when the first-order estimate of the repaired gap is within this factor
# of the target (the estimate is pessimistic: on 300-3,000-child parents the repaired gap was
# 2-4x below it, and waiting for estimate <= target cost 20-50 % more iterations)
_REPAIR_GATE = 3.0
# a batch starts its Anderson acceleration after this many iterations: most small parents are
# certified at the first check (block-shaped batches: median 10 iterations), and accelerating
# them from the start cost 15 % more time per parent instead of saving any
_AA_BATCH_START = 10
# ... and stops it after this many: the parents still open then are the few it does not help
# (in the US-shaped run without this stop, 51 of 70,486 persons block-group-level parents and 96
# of 234,286 units block-level ones ran to max_iter accelerated, off their held totals, and were
# solved again; plain from where they stand they converge, as the plain ADMM does from any point)
_AA_BATCH_STOP = 500
# an accelerated parent whose infeasibility (persons) exceeds this multiple of its first
# check's (floored at 1) is stopped as diverged and solved again plainly (:func:`_run`). Seen
# on a real block-group batch of the 10 M job: 12 persons at the first check, 1,940 twenty
# iterations later, then rho doubling to 1e16 and 5,000 iterations uncertified
_DIVERGED = 100.0


# -- rules shared by both layouts -------------------------------------------------------------
#: the initial rho of a parent on the scale-relative residual path (:class:`_One`), as a
#: fraction of :func:`initial_rho`
_SCALED_RHO0 = 0.1


def initial_rho(lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Initial penalty from the curvature range ``[lo, hi]`` of the x-step: the geometric
    mean (``lo`` floored at ``1e-12 hi``), 1 when f is flat. Float or per-parent ``(P,)``."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    safe = np.where(hi > 0, hi, 1.0)
    return np.where(hi > 0, np.sqrt(np.maximum(lo, 1e-12 * safe) * safe), 1.0)


def rho_factor(r: np.ndarray | float, dual: np.ndarray | float,
               balance: float = 10.0) -> np.ndarray:
    """Residual balancing (Boyd et al. 2011, 3.4.1): rho is doubled when the primal residual
    ``r`` exceeds ``balance`` times the dual one, halved in the opposite case, else kept."""
    r, dual = np.asarray(r), np.asarray(dual)
    return np.where(r > balance * dual, 2.0, np.where(dual > balance * r, 0.5, 1.0))


def _stop(f: np.ndarray | float, gap: np.ndarray | float, infeas: np.ndarray | float,
          tol: float, feas_tol: float) -> np.ndarray:
    """The stopping rule: ``gap <= tol * f`` and ``infeas <= feas_tol`` (persons)."""
    return (np.asarray(gap) <= tol * np.maximum(f, 1e-300)) & (np.asarray(infeas) <= feas_tol)


# -- Anderson acceleration ----------------------------------------------------------------------
class Anderson:
    """Type-II Anderson acceleration (Walker & Ni 2011), restarted when it fails to help
    (the safeguard of Zhang, O'Donoghue & Boyd 2020, simplified), of the ADMM seen as a
    fixed-point map on its Douglas-Rachford variable ``s``, for P parents at once.

    An iteration maps ``s = Z + U`` (with the bound split, also ``W + U2``) to the point
    ``F(s) = X + U`` it projects (``W``: clips), and ``Z = P(s)``, ``U = s - Z`` follow from
    it; the plain ADMM is ``s <- F(s)``. Given a parent's last ``m`` differences of ``F`` and
    of the residual ``g = F(s) - s``, its accelerated point is ``F(s) - dF gamma`` with
    ``gamma`` the least-squares fit of ``g`` by ``dG`` (an ``m x m`` Gram system). It replaces
    ``F(s)`` *before* the projection, so every ``Z`` is still an exact projection (C1-feasible)
    and the certificate and stopping rule are the ADMM's: acceleration changes where the
    iterates go, never what a certified result means. A parent whose last extrapolation did
    not reduce ``|g|`` drops its history and takes a plain step; so does one whose map changed
    (:meth:`forget`, after a change of its rho). The acceleration has no convergence proof of
    its own: ``solver.AdmmSolver`` repeats a parent it left uncertified with the plain ADMM.

    The ADMM here converges linearly and slowly (hundreds of iterations on tract- and
    county-shaped parents), which is where extrapolating from a few secants pays: with the
    dense x-step 340 -> 90 iterations on a 30-child synthetic tract parent, 470 -> 110 on a
    100-child one, 1,020 -> 430 on a real 227-child one, 190 -> 70 on a batched 30-child one
    (BENCHMARKS.md, session 19). Used by the dense one-parent x-step (:class:`_One`) and the
    batches (:class:`_Batch`). Vectors are ``(P, size)``; the history is ``2 m`` of them.
    """

    def __init__(self, P: int, size: int, memory: int, reg: float = 1e-10):
        self.m = memory
        self.reg = reg
        self.dF = np.empty((P, memory, size))  # differences of consecutive F outputs
        self.dG = np.empty((P, memory, size))  # differences of consecutive residuals
        self.gram = np.zeros((P, memory, memory))
        self.rhs = np.zeros((P, memory))  # dG' g of the last step
        self.valid = np.zeros((P, memory), dtype=bool)  # which slots hold a parent's secants
        self.F_prev = np.empty((P, size))
        self.g = np.empty((P, size))
        self.g_prev = np.empty((P, size))
        self.prev_ok = np.zeros(P, dtype=bool)  # F_prev / g_prev are of the current map
        self.gg_prev = np.full(P, np.inf)
        self.count = 0  # slots in use (0..count-1), the same for every parent
        self.head = 0  # slot the next differences go to

    def forget(self, which: np.ndarray) -> None:
        """Drop the history of parents ``which`` (bool ``(P,)``): their map changed."""
        self.valid[which] = False
        self.prev_ok[which] = False
        self.gg_prev[which] = np.inf

    def take(self, keep: np.ndarray) -> None:
        """Keep only parents ``keep`` (bool ``(P,)``)."""
        for name in ("dF", "dG", "gram", "rhs", "valid", "F_prev", "g", "g_prev", "prev_ok",
                     "gg_prev"):
            setattr(self, name, getattr(self, name)[keep])

    def step(self, F: np.ndarray, s: np.ndarray) -> None:
        """Replace ``F = F(s)`` (``(P, size)``, in place) by the accelerated points."""
        g = self.g
        np.subtract(F, s, out=g)
        gg = np.einsum("pn,pn->p", g, g)
        # the last extrapolation did not reduce the residual (or went non-finite): drop the
        # history, and this step is plain
        bad = ~(gg <= self.gg_prev)
        self.valid[bad] = False
        if self.prev_ok.any():
            j = self.head
            np.subtract(F, self.F_prev, out=self.dF[:, j])
            np.subtract(g, self.g_prev, out=self.dG[:, j])
            self.head = (j + 1) % self.m
            self.count = c = min(self.count + 1, self.m)
            self.valid[:, j] = self.prev_ok & ~bad
            row = (self.dG[:, :c] @ self.dG[:, j, :, None])[:, :, 0]
            self.gram[:, j, :c] = row
            self.gram[:, :c, j] = row
            # dG' g from last step's dG' g_prev, as g = g_prev + dG_j (one pass, not m)
            self.rhs[:, :c] += row
            self.rhs[:, j] = np.einsum("pn,pn->p", self.dG[:, j], g)
        np.copyto(self.F_prev, F)
        self.g, self.g_prev = self.g_prev, g
        self.gg_prev = np.where(np.isfinite(gg), gg, np.inf)
        self.prev_ok[:] = True
        c = self.count
        v = self.valid[:, :c]
        if not v.any():
            return
        # a parent's unused slots get an identity row and a zero right side: gamma 0 there
        G = self.gram[:, :c, :c] * (v[:, :, None] & v[:, None, :])
        tr = np.einsum("pii->p", G)
        eye = np.eye(c)
        G += eye * (self.reg * tr + 1e-300)[:, None, None] + eye * (~v)[:, :, None]
        try:
            gamma = np.linalg.solve(G, (self.rhs[:, :c] * v)[:, :, None])
        except np.linalg.LinAlgError:
            self.valid[:] = False
            return
        ok = np.isfinite(gamma).all(axis=(1, 2))
        if not ok.all():  # a degenerate fit: those parents restart, their step is plain
            self.valid[~ok] = False
            gamma[~ok] = 0.0
        F -= (gamma.transpose(0, 2, 1) @ self.dF[:, :c])[:, 0]


# -- one parent ---------------------------------------------------------------------------------
class XInverse(Protocol):
    """``(H + rho B)^-1`` of the one-parent x-step, ``B = I (+ G'G)``."""

    mu: float  # strong-convexity modulus of f on the domain (>= 0)

    def eig_range(self) -> tuple[float, float]: ...

    def set_rho(self, rho: float) -> None: ...

    def apply(self, R: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...


class DenseInverse:
    """``(H + rho B)^-1`` on the domain with ``B = I (+ G'G)``, by one generalised eigh."""

    def __init__(self, obj: Objective):
        H = dense_normal_matrix(obj.sys, obj.w)
        n = H.shape[0]
        if obj.lower is not None:
            ans = obj.sys.terms[obj.prob.bound_query].ans
            B = np.eye(n) + (ans[:, None] == ans[None, :])
            self.lam, self.V = scipy.linalg.eigh(H, B)
            self.mu = float(max(np.linalg.eigvalsh(H).min(), 0.0)) if n else 0.0
        else:
            self.lam, self.V = np.linalg.eigh(H)
            self.mu = float(max(self.lam.min(), 0.0)) if n else 0.0
        self.lam = np.maximum(self.lam, 0.0)
        self.rho = 1.0

    def eig_range(self) -> tuple[float, float]:
        if self.lam.size == 0:
            return 1.0, 1.0
        return float(self.lam.min()), float(self.lam.max())

    def set_rho(self, rho: float) -> None:
        self.rho = float(rho)
        self._d = 1.0 / (self.lam + self.rho)

    def apply(self, R: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul((R @ self.V) * self._d[None, :], self.V.T, out=out)


class KronXInverse:
    """Full-grid ``(H + rho I + rho G'G)^-1`` by :class:`KronInverse` (uniform weights only)."""

    def __init__(self, obj: Objective, weights: dict[str, float]):
        self.op = KronInverse(obj.prob.spec, weights | (
            {obj.prob.bound_query: weights.get(obj.prob.bound_query, 0.0)}
            if obj.lower is not None else {}
        ))
        self.bound = obj.prob.bound_query if obj.lower is not None else None
        lo, hi = self.op.eig_range()
        self.mu = max(lo, 0.0)
        self._range = (lo, hi)

    def eig_range(self) -> tuple[float, float]:
        return self._range

    def set_rho(self, rho: float) -> None:
        self.op.set_rho(rho, {self.bound: rho} if self.bound else None)

    def apply(self, R: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.op.apply(R, out=out)


def make_inverse(obj: Objective, xstep: Literal["kron", "dense"]) -> tuple[XInverse, str]:
    """The x-step inverse ``solver.xstep_for`` chose, and the method name; the Kronecker
    operator may decline the spec (``ValueError``), then the dense one is used."""
    weights = obj.uniform_weights()
    if xstep == "kron" and weights is not None:
        try:
            return KronXInverse(obj, weights), "admm-kron"
        except ValueError:
            pass
    return DenseInverse(obj), "admm-eig"


class Workspace:
    """The one-parent ADMM's work arrays and caches around an :class:`Objective` (which stays
    a value): scratch ``(k, n)`` arrays, the disallowed mask, the bound query's cell runs, the
    certificate projection's last thresholds, the Kronecker ``H`` for large full-grid parents.
    Implements ``certificate.CertificateOps`` for one parent."""

    held = None  # every row total of a parent is held (when there are totals)

    def __init__(self, obj: Objective, flags: KernelFlags):
        self.obj = obj
        self.flags = flags
        self.k, self.n = obj.k, obj.n
        self.p = obj.p
        self.allowed = obj.allowed
        self.consistency = obj.consistency
        self.totals = obj.totals
        self.lower = obj.lower
        self.mu = 0.0  # strong-convexity modulus of f on the domain, set by the solver
        # masking costs several passes per projection: skip it when every entry is allowed
        self._mask = None if obj.allowed.all() else obj.allowed
        self._neg: np.ndarray | None = None
        self._bq_starts: np.ndarray | None = None
        self._bq_checked = False
        self._lb_tau: np.ndarray | None = None  # thresholds of the last certificate projection
        self._work: list[np.ndarray] = []
        self._kron: KronInverse | None = None
        self._c0 = 0.0
        weights = obj.uniform_weights() if flags.fast_hess else None
        if weights is not None:
            try:
                self._kron = KronInverse(obj.prob.spec, weights)
            except ValueError:
                self._kron = None
            self._c0 = 0.5 * sum(float(np.sum(obj.w[q][None, :] * obj.y[q] ** 2))
                                 for q in obj.queries) + obj.const_off

    def scratch(self, i: int, like: np.ndarray | None = None) -> np.ndarray:
        """(k, n) float64 work array number i, kept on the workspace."""
        while len(self._work) <= i:
            self._work.append(np.empty((self.k, self.n)))
        return self._work[i]

    def neg_mask(self) -> np.ndarray | None:
        """0 on allowed entries, -inf elsewhere (added to a point before the projection)."""
        if self._mask is None:
            return None
        if self._neg is None:
            self._neg = np.where(self.allowed, 0.0, -np.inf)
        return self._neg

    def value_grad(self, X: np.ndarray) -> tuple[float, np.ndarray]:
        """``(f(X), grad f(X))``. On large full-grid parents ``grad = H X - b`` with the
        Kronecker ``H`` and ``f = <X, H X/2 - b> + c0``; the expanded form loses nothing here
        because ``c0`` (the value at X = 0) is of the size of f itself."""
        if self._kron is not None:
            g = self._kron.forward(X)
            g -= self.obj.b
            f = 0.5 * (float(np.vdot(X, g)) - float(np.vdot(X, self.obj.b))) + self._c0
            return f, g
        return self.obj.value_grad(X)

    def project_inplace(
        self, V: np.ndarray, out: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """C1 projection for the loop: ``V`` (k, n) is scratch (overwritten), the result goes
        to ``out``; ``tau`` (n,) warm-starts the per-cell thresholds (None: cold, by
        sorting). Returns ``(out, tau)``; same projection as ``Objective.project``."""
        if not self.consistency:
            np.maximum(V, 0.0, out=out)
            if self._mask is not None:
                out *= self._mask
            return out, None
        if tau is None or not self.flags.warm_projection:
            X, tau = project_columns_sort(V, self.p, self._mask)
            out[...] = X
            return out, tau
        neg = self.neg_mask()
        if neg is not None:
            V += neg
        return project_columns_warm(V, self.p, tau, out=out)

    def project_cert(self, V: np.ndarray, out: np.ndarray) -> np.ndarray:
        S, self._lb_tau = self.project_inplace(V, out, self._lb_tau)
        return S

    def _bound_groups(self) -> np.ndarray | None:
        """Start of each answer's cell run when the bound query's answers are contiguous
        runs of the (sorted) domain, as for hhgq, the slowest PL94 axis; else None."""
        if not self._bq_checked:
            self._bq_checked = True
            ans = self.obj.sys.terms[self.obj.prob.bound_query].ans
            if ans.size and bool(np.all(np.diff(ans) >= 0)):
                self._bq_starts = np.flatnonzero(np.r_[True, np.diff(ans) > 0])
        return self._bq_starts

    def bound_answer(self, X: np.ndarray) -> np.ndarray:
        """``G X`` (k, n_local answers of the bound query)."""
        starts = self._bound_groups()
        if starts is not None and X.shape[1] == self.n:
            return np.add.reduceat(X, starts, axis=1)
        return self.obj.bound_answer(X)

    def bound_back_add(self, R: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``R += G' A`` in place (no (k, n) temporary when the answers are cell runs)."""
        starts = self._bound_groups()
        if starts is None or not self.flags.warm_projection:  # small: one gather is cheaper
            R += self.obj.bound_back(A)
            return R
        ends = np.r_[starts[1:], self.n]
        size = ends - starts
        if R.flags.c_contiguous and np.all(size == size[0]):  # equal runs: one broadcast
            R.reshape(R.shape[0], starts.size, int(size[0]))[...] += A[:, :, None]
            return R
        for i, (a, b) in enumerate(zip(starts, ends)):
            R[:, a:b] += A[:, i:i + 1]
        return R


def _xstep(ws: Workspace, inv: XInverse, R: np.ndarray, u: np.ndarray, s: float,
           out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """x-step ``M^-1 R`` plus the closed-form consistency / row-total corrections (module
    docstring); ``out`` (k, n) optionally receives X. Returns ``(X, alpha or None)``."""
    obj = ws.obj
    V = inv.apply(R) if out is None else inv.apply(R, out=out)
    k = obj.k
    mu = ((obj.p - V.sum(axis=0)) / k) if obj.consistency else None
    alpha = None
    if obj.totals is not None:
        # row sums after the consistency shift: V 1 + sum(mu)
        rows = V.sum(axis=1) + (float(mu.sum()) if mu is not None else 0.0)
        alpha = (obj.totals - rows) / s
    if mu is None and alpha is None:
        return V, alpha
    if not ws.flags.inplace_xstep:  # small parents: fewer numpy calls beat fewer passes
        if mu is not None:
            V += mu[None, :]
        if alpha is not None:
            V += alpha[:, None] * u[None, :]
        return V, alpha
    # V += 1 mu' + alpha u' as one rank-2 update (one pass, in place on V's memory)
    A = np.zeros((V.shape[1], 2), order="F")
    B = np.zeros((2, k), order="F")
    if mu is not None:
        A[:, 0], B[0] = mu, 1.0
    if alpha is not None:
        A[:, 1], B[1] = u, alpha
    if V.flags.c_contiguous:
        r = scipy.linalg.blas.dgemm(1.0, A, B, beta=1.0, c=V.T, overwrite_c=1)
        if not np.may_share_memory(r, V):  # f2py made a copy after all
            V[...] = r.T
    else:
        V += (A @ B).T
    return V, alpha


# -- the one ADMM loop --------------------------------------------------------------------------
class _Layout(Protocol):
    """The arrays of one ADMM run: one parent (:class:`_One`) or a padded batch
    (:class:`_Batch`). Per-parent values are ``(P,)`` arrays (P = 1 for one parent). The
    layout owns its iterates, ``rho`` and x-step factorisation and does the array arithmetic
    of each step; :func:`_run` owns the control flow and the rules."""

    def curvature(self) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Curvature range ``(lo, hi)`` of the x-step operator (sets the initial rho)."""

    def set_rho(self, rho: np.ndarray) -> None:
        """The initial penalty (before :meth:`start`)."""

    def start(self) -> None:
        """First x-step from ``b``, its projection, zero duals."""

    def iterate(self, relax: float) -> None:
        """One over-relaxed ADMM iteration (x-step, z-step, dual updates)."""

    def check(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Certificate at the current iterate: ``(f, lower bound, gap, spread, infeas)``."""

    def repair(self, open_: np.ndarray, f: np.ndarray, lb: np.ndarray, infeas: np.ndarray,
               tol: float, feas_tol: float, it: int) -> np.ndarray:
        """Certify repaired points for parents ``open_`` (not yet certified) where possible;
        returns which were (their results are recorded)."""

    def emit(self, done: np.ndarray, ok: np.ndarray, f: np.ndarray, gap: np.ndarray,
             spread: np.ndarray, infeas: np.ndarray, it: int) -> None:
        """Record the results of parents ``done`` (certified where ``ok``)."""

    def residuals(self, relax: float) -> tuple[np.ndarray, np.ndarray]:
        """Primal and dual residual norms per parent (residual balancing)."""

    def drop(self, keep: np.ndarray) -> None:
        """Keep only parents ``keep`` (bool ``(P,)``) in the run."""

    def rescale(self, fac: np.ndarray) -> None:
        """``rho *= fac`` per parent: scaled duals and the x-step factorisation follow."""

    def accelerated(self) -> np.ndarray:
        """Per parent (bool ``(P,)``): whether its iterates are Anderson-extrapolated."""


def _run(lay: _Layout, tol: float, feas_tol: float, max_iter: int, relax: float,
         check_every: int, balance: float) -> None:
    """The ADMM control flow shared by every layout: initial rho, iterations, a certificate
    every ``check_every`` iterations, the stopping rule, the held-totals repair, certified
    parents leaving the run, residual balancing. Results go to the layout."""
    lay.set_rho(initial_rho(*lay.curvature()))
    lay.start()
    first: np.ndarray | None = None  # infeasibility at the first check, per parent in the run
    for it in range(1, max_iter + 1):
        lay.iterate(relax)
        if it % check_every and it != max_iter:
            continue
        f, lb, gap, spread, infeas = lay.check()
        if first is None:
            first = np.maximum(np.where(np.isfinite(infeas), infeas, 0.0), 1.0)
        ok = _stop(f, gap, infeas, tol, feas_tol)
        repaired = lay.repair(~ok, f, lb, infeas, tol, feas_tol, it)
        # an accelerated parent whose infeasibility grew _DIVERGED-fold since the first check
        # (or went non-finite) has left the plain ADMM's path for good in practice (rho then
        # climbs without bound); it stops here, uncertified and off its constraints, and
        # ``solver.AdmmSolver`` solves it again by the plain ADMM from the start
        diverged = lay.accelerated() & ~ok & ~repaired & ~(infeas <= _DIVERGED * first)
        done = ok | repaired | diverged | (it == max_iter)
        lay.emit(done & ~repaired, ok, f, gap, spread, infeas, it)
        if done.all():
            return
        r, dual = lay.residuals(relax)
        fac = rho_factor(r, dual, balance)
        if done.any():
            lay.drop(~done)
            fac = fac[~done]
            first = first[~done]
        lay.rescale(fac)


class _One:
    """One parent: ``(k, n)`` iterates reused in place (fresh large temporaries cost page
    faults on every iteration), the dense or Kronecker x-step, warm-started projections, the
    held-totals repair (:func:`_repair`)."""

    def __init__(self, obj: Objective, xstep: Literal["kron", "dense"], flags: KernelFlags,
                 anderson: int = 0):
        self.obj = obj
        self.inv, self.method = make_inverse(obj, xstep)
        # the acceleration costs ~10 passes over the iterate per iteration: small beside the
        # dense x-step's matmul (2-4x fewer iterations, a net 2-3x), but ~60 % on top of a
        # Kronecker iteration, where on real state parents (held totals, bound split) it
        # did not cut the iterations (2,620 -> 3,420 on one; BENCHMARKS.md, session 19)
        self.anderson = anderson if self.method == "admm-eig" else 0
        self.ws = Workspace(obj, flags)
        self.ws.mu = self.inv.mu
        self.low = obj.lower  # not None exactly when the bound query is split (G X = W)
        self.can_repair = obj.totals is not None and obj.consistency and obj.k > 1
        self.result: L2Result | None = None
        self.rho = 1.0
        # Residual balancing on scale-relative residuals (OSQP's rule: the primal residual over
        # the size of the iterates, the dual one over the size of the dual and the linear term)
        # for the Kronecker path's parents with held totals: the state parents of the county
        # level (and the nation, parent of the states, whose totals are invariant). On the 10 M
        # job's three real state parents it halves the iterations (2,410 / 1,690 / 2,620 ->
        # 1,210 / 1,010 / 1,040; the US-shaped run's county level 185 -> 134 s; BENCHMARKS.md,
        # session 21). Kept to them: on the batched small parents it moved nothing measurable
        # and changed rounded counts, and on the dense-tract shape without totals relative
        # residuals took 80 -> 340 iterations (session 20).
        self.scaled = self.method == "admm-kron" and obj.totals is not None

    def curvature(self) -> tuple[float, float]:
        return self.inv.eig_range()

    def set_rho(self, rho: np.ndarray) -> None:
        # on the scale-relative path, a tenth of the curvature's geometric mean: rho then
        # only rises where the relative residuals ask for it, which the curvature's scale
        # overshoots on every real parent measured (the 10 M job's nation and four state
        # parents, both estimators: 260 -> 150-160 and 1,040-3,610 -> 550-1,440 iterations;
        # BENCHMARKS.md, session 24)
        self.rho = float(rho) * (_SCALED_RHO0 if self.scaled else 1.0)
        self.inv.set_rho(self.rho)

    def _ones_solve(self) -> None:
        u = self.inv.apply(np.ones((1, self.obj.n)))[0]
        self.u, self.s = u, float(u.sum())

    def start(self) -> None:
        obj, ws = self.obj, self.ws
        self._ones_solve()
        X, self.alpha = _xstep(ws, self.inv, obj.b.copy(), self.u, self.s)
        self.X = X
        self.Z = obj.project(X)
        self.U = np.zeros_like(self.Z)
        self.tau: np.ndarray | None = None  # thresholds of the last z-step (warm start)
        self.W = self.U2 = np.zeros((0, 0))
        if self.low is not None:
            W = np.maximum(ws.bound_answer(self.Z), self.low)
            if obj.upper is not None:
                W = np.minimum(W, obj.upper)
            self.W = W
            self.U2 = np.zeros_like(W)
        # (k, n) work arrays, reused
        self.R = np.empty_like(self.Z)
        self.T = np.empty_like(self.Z)
        self.Zold = np.empty_like(self.Z)
        self.aa: Anderson | None = None
        if self.anderson:
            # flat Douglas-Rachford variables s = Z + U [, W + U2] and F(s), one buffer each
            kn = self.Z.size
            size = kn + (self.W.size if self.low is not None else 0)
            self.aa = Anderson(1, size, self.anderson)
            self._s, self._F = np.empty((1, size)), np.empty((1, size))
            self._kn = kn
            self._fill_s()

    def _fill_s(self) -> None:
        """``s = Z + U [, W + U2]``, the point the current iterates are the projection of."""
        kn, s = self._kn, self._s[0]
        np.add(self.Z, self.U, out=s[:kn].reshape(self.Z.shape))
        if self.low is not None:
            np.add(self.W, self.U2, out=s[kn:].reshape(self.W.shape))

    def _x(self) -> np.ndarray:
        """The exact x-step from the current iterates (into ``self.X``; sets ``alpha``)."""
        obj, ws, rho, R = self.obj, self.ws, self.rho, self.R
        np.subtract(self.Z, self.U, out=R)  # R = b + rho (Z - U) [+ rho G'(W - U2)]
        R *= rho
        R += obj.b
        if self.low is not None:
            ws.bound_back_add(R, rho * (self.W - self.U2))
        X, self.alpha = _xstep(ws, self.inv, R, self.u, self.s, out=self.X)
        return X

    def iterate(self, relax: float) -> None:
        if self.aa is not None:
            self._iterate_accelerated(relax)
            return
        obj, ws, low = self.obj, self.ws, self.low
        T, U, W, U2 = self.T, self.U, self.W, self.U2
        X = self._x()
        if low is not None:
            GXh = relax * ws.bound_answer(X) + (1.0 - relax) * W
        X *= relax  # X <- relaxed Xh = relax X + (1 - relax) Z
        np.multiply(self.Z, 1.0 - relax, out=T)
        X += T
        np.add(X, U, out=T)
        self.Z, self.Zold = self.Zold, self.Z
        self.Z, self.tau = ws.project_inplace(T, self.Z, self.tau)
        U += X
        U -= self.Z
        if low is not None:
            W = np.maximum(GXh + U2, low)
            if obj.upper is not None:
                W = np.minimum(W, obj.upper)
            U2 += GXh - W
            self.W = W
        self.X = X

    def _iterate_accelerated(self, relax: float) -> None:
        """The iteration of :meth:`iterate` written on ``s`` (:class:`Anderson`): the same
        x-step and relaxation give ``F(s)``, which is extrapolated, then projected."""
        obj, ws, low, aa = self.obj, self.ws, self.low, self.aa
        assert aa is not None
        T, U, W, U2 = self.T, self.U, self.W, self.U2
        kn, shape = self._kn, self.Z.shape
        X = self._x()
        F = self._F
        F1 = F[0, :kn].reshape(shape)
        if low is not None:
            np.add(relax * ws.bound_answer(X) + (1.0 - relax) * W, U2,
                   out=F[0, kn:].reshape(W.shape))
        X *= relax  # X <- relaxed Xh = relax X + (1 - relax) Z
        np.multiply(self.Z, 1.0 - relax, out=T)
        X += T
        np.add(X, U, out=F1)
        aa.step(F, self._s)
        self._s, self._F = F, self._s  # s <- the accelerated point
        np.copyto(T, F1)
        self.Z, self.Zold = self.Zold, self.Z
        self.Z, self.tau = ws.project_inplace(T, self.Z, self.tau)
        np.subtract(F1, self.Z, out=U)
        if low is not None:
            F2 = F[0, kn:].reshape(W.shape)
            W = np.maximum(F2, low)
            if obj.upper is not None:
                W = np.minimum(W, obj.upper)
            self.W = W
            self.U2 = F2 - W
        self.X = X

    def _nu(self) -> np.ndarray | None:
        if self.low is None:
            return None
        nu = np.maximum(-self.rho * self.U2, 0.0)
        if self.obj.upper is not None:
            nu[self.obj.upper == 0.0] = 0.0  # forced-zero answers: Z is 0 there already
        return nu

    def check(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.nu = self._nu()
        f, grad = self.ws.value_grad(self.Z)
        lb_a, spread_a, infeas_a = certificate(self.ws, self.Z, f, grad, self.alpha, self.nu)
        lb = float(lb_a)
        gap = max(f - lb, 0.0)
        infeas = float(infeas_a)
        return (np.array([f]), np.array([lb]), np.array([gap]), np.array([float(spread_a)]),
                np.array([infeas]))

    def repair(self, open_: np.ndarray, f: np.ndarray, lb: np.ndarray, infeas: np.ndarray,
               tol: float, feas_tol: float, it: int) -> np.ndarray:
        obj, alpha = self.obj, self.alpha
        f0, lb0 = float(f[0]), float(lb[0])
        if (open_[0] and self.can_repair and float(infeas[0]) > feas_tol
                and alpha is not None and obj.totals is not None):
            # first-order value of f at the repaired point: f + alpha'(t - Z 1)
            pred = f0 + float(np.sum(alpha * (obj.totals - self.Z.sum(axis=1))))
            if pred - lb0 <= _REPAIR_GATE * tol * max(f0, 1e-300):
                res = _repair(self.ws, self.Z, lb0, alpha, self.nu, tol, feas_tol, it,
                              self.method)
                if res is not None:
                    self.result = res
                    return np.array([True])
        return np.array([False])

    def emit(self, done: np.ndarray, ok: np.ndarray, f: np.ndarray, gap: np.ndarray,
             spread: np.ndarray, infeas: np.ndarray, it: int) -> None:
        if done[0]:
            self.result = L2Result(self.Z, float(f[0]), float(gap[0]), float(spread[0]),
                                   float(infeas[0]), it, bool(ok[0]), self.method)

    def residuals(self, relax: float) -> tuple[np.ndarray, np.ndarray]:
        T = self.T
        np.subtract(self.X, self.Z, out=T)
        r = float(np.linalg.norm(T)) / relax  # X - Z = (Xh - Z) / relax
        np.subtract(self.Z, self.Zold, out=T)
        dual = self.rho * float(np.linalg.norm(T))
        if self.scaled:  # each relative to the size of what it measures (see __init__)
            r /= max(float(np.linalg.norm(self.X)), float(np.linalg.norm(self.Z)), 1e-300)
            dual /= max(self.rho * float(np.linalg.norm(self.U)), float(np.linalg.norm(self.obj.b)), 1e-300)
        return np.array([r]), np.array([dual])

    def drop(self, keep: np.ndarray) -> None:
        pass  # one parent: the run ends when it is done

    def rescale(self, fac: np.ndarray) -> None:
        f = float(fac[0])
        if f != 1.0:
            self.rho *= f
            self.U /= f
            if self.low is not None:
                self.U2 /= f
            self.inv.set_rho(self.rho)
            self._ones_solve()
            if self.aa is not None:  # a new map: its history no longer applies
                self.aa.forget(np.ones(1, dtype=bool))
                self._fill_s()

    def accelerated(self) -> np.ndarray:
        return np.array([self.aa is not None])


def admm(
    obj: Objective,
    xstep: Literal["kron", "dense"],
    flags: KernelFlags,
    tol: float = 1e-9,
    feas_tol: float = 1e-7,
    max_iter: int = 5000,
    relax: float = 1.6,
    check_every: int = 10,
    balance: float = 10.0,
    anderson: int = 8,
) -> L2Result:
    """Solve one parent's least squares by ADMM; stop when ``gap <= tol * f`` and
    ``infeas <= feas_tol``. If ``max_iter`` is hit the result has ``certified=False``.

    ``xstep`` / ``flags``: the x-step inverse and large-array kernels (``solver.xstep_for``,
    ``solver.kernel_flags``). ``balance``: rho is doubled / halved when the primal and dual
    residuals differ by more than this factor (checked every ``check_every`` iterations).
    ``anderson``: history length of the :class:`Anderson` acceleration (0: plain ADMM).
    With held child totals the row sums of the C1 iterate converge slowly while the iterate
    is already near-optimal, so at a check that is optimal but not yet feasible enough, the
    iterate is moved onto the totals (:func:`_repair`) and certified there instead.
    """
    lay = _One(obj, xstep, flags, anderson)
    _run(lay, tol, feas_tol, max_iter, relax, check_every, balance)
    assert lay.result is not None
    return lay.result


def _repair(ws: Workspace, Z: np.ndarray, lb: float, alpha: np.ndarray, nu: np.ndarray | None,
            tol: float, feas_tol: float, it: int, method: str) -> L2Result | None:
    """Certify a point near the C1 iterate ``Z`` that meets the held totals, or None.

    ``Z`` is moved onto the row totals by support corrections (:func:`fix_row_sums`) and
    re-projected onto C1 (exact column sums, x >= 0, zeros), so it stays C1-feasible. Lower
    bounds on f* are valid from any C1 point: the best of the one at ``Z`` (``lb``), the one at
    the repaired point with the ADMM multipliers and, for the linear bound (mu = 0), the one
    with row multipliers refitted on the repaired point's support (``fit_row_col_offsets``).
    """
    obj = ws.obj
    assert obj.totals is not None
    Zr = fix_row_sums(Z, obj.p, obj.totals)
    # Zr is C1 up to rounding (clipped corrections): an exact projection, warm-started at
    # tau = 0 (the threshold of a point already in C1), makes it C1 to working precision
    Zr, _ = ws.project_inplace(Zr.copy(), Zr, np.zeros(obj.n))
    infeas = float(infeasibility(ws, Zr))
    if infeas > feas_tol:
        return None
    f, grad = ws.value_grad(Zr)
    lb2, spread = lower_bound(ws, Zr, f, grad, alpha, nu)
    lb = max(lb, float(lb2))
    if f - lb > tol * max(f, 1e-300) and ws.mu == 0:
        # the linear (mu = 0) bound needs accurate multipliers: refit them on Zr's support
        G = grad if nu is None else grad - obj.bound_back(nu)
        a, _ = fit_row_col_offsets(Zr, G)
        lb = max(lb, float(lower_bound(ws, Zr, f, grad, a, nu)[0]))
    gap = max(f - lb, 0.0)
    if gap > tol * max(f, 1e-300):
        return None
    return L2Result(Zr, f, gap, float(spread), infeas, it, True, method)


# -- a batch of small parents -------------------------------------------------------------------
def spd_inverse(M: np.ndarray) -> np.ndarray:
    """Inverses of symmetric positive definite matrices ``M (P, n, n)``, by Cholesky
    (LAPACK ``potrf`` / ``potri``, one call each per matrix): about half the time of the
    batched LU ``np.linalg.inv`` at n = 50-130; below n = 16 the Python loop costs more than
    it saves, so those take the batched LU (BENCHMARKS.md, session 20). A matrix that is not
    numerically positive definite falls back to ``np.linalg.inv``."""
    P, n, _ = M.shape
    if n < 16:  # tiny matrices: one batched call beats a Python loop of LAPACK calls
        return np.linalg.inv(M)
    out = np.empty_like(M)
    potrf, potri = scipy.linalg.lapack.dpotrf, scipy.linalg.lapack.dpotri
    for i in range(P):
        c, info = potrf(M[i], lower=1, clean=0)
        if info == 0:
            c, info = potri(c, lower=1, overwrite_c=1)
        out[i] = c if info == 0 else np.linalg.inv(M[i])
    # potri fills the lower triangle only: mirror it (one gather-scatter of the halves)
    iu, ju = np.triu_indices(n, 1)
    out[:, iu, ju] = out[:, ju, iu]
    return out


def _inverse_sqrt_grouped(B: np.ndarray) -> np.ndarray:
    """``B^-1/2`` of ``B = I + E (P, n, n)``, E the 0/1 "same group" matrix of a partition of
    the cells (``G'G`` of a grouping query; a cell in no group has a zero row): on a group of
    m cells ``(I + J)^-1/2 = I + c J`` with ``c = (1/sqrt(1 + m) - 1) / m``, so no
    factorisation is needed (``S B S = I``: the pencil ``(H, B)`` has the eigenvalues of
    ``S H S``)."""
    n = B.shape[1]
    eye = np.eye(n, dtype=bool)
    E = np.where(eye, B - 1.0, B)  # the "same group" indicator, diagonal included
    m = E.sum(axis=2)  # size of each cell's group (0: in none)
    c = np.where(m > 0, (1.0 / np.sqrt(1.0 + m) - 1.0) / np.maximum(m, 1.0), 0.0)
    return eye + E * c[:, :, None]


class _Group:
    """Padded arrays of P parents that share one splitting layout (all with ``G X = W`` or
    none): children ``(P, K)``, cells ``(P, n)``, iterates ``(P, K, n)``.

    Padding is inert: padded cells have ``p = 0`` and no allowed child, padded children no
    allowed cell, so the projection keeps them at 0, the block-diagonal ``M`` keeps them
    decoupled and ``u = M^-1 1`` is taken over real cells only. Implements
    ``certificate.CertificateOps`` for the batch.
    """

    consistency = True

    def __init__(self, objs: list[Objective]):
        P = len(objs)
        self.K = K = max(o.k for o in objs)
        self.n = n = max(max(o.n for o in objs), 1)
        self.split = objs[0].lower is not None
        self.queries = objs[0].queries
        bq = objs[0].prob.bound_query
        self.k = np.array([o.k for o in objs], dtype=np.float64)
        self.rows = np.zeros((P, K), dtype=bool)
        self.allowed = np.zeros((P, K, n), dtype=bool)
        self.dom = np.zeros((P, n))
        self.p = np.zeros((P, n))
        self.b = np.zeros((P, K, n))
        self.const = np.array([o.const_off for o in objs])
        self.has_t = any(o.totals is not None for o in objs)
        self.t = np.zeros((P, K))
        self.trows = np.zeros((P, K), dtype=bool)  # children whose total is held
        for i, o in enumerate(objs):
            self.rows[i, : o.k] = True
            self.allowed[i, : o.k, : o.n] = o.allowed
            self.dom[i, : o.n] = 1.0
            self.p[i, : o.n] = o.p
            self.b[i, : o.k, : o.n] = o.b
            if o.totals is not None:
                self.t[i, : o.k] = o.totals
                self.trows[i, : o.k] = True
        # per-query answers, padded: slot A-1 collects padded cells (weight 0, target 0)
        self.ans: dict[str, np.ndarray] = {}
        self.w: dict[str, np.ndarray] = {}
        self.y: dict[str, np.ndarray] = {}
        names = self.queries + ((bq,) if self.split else ())
        for q in dict.fromkeys(names):
            A = max(o.sys.terms[q].n_local for o in objs) + 1
            ans = np.full((P, n), A - 1, dtype=np.int64)
            w = np.zeros((P, A))
            y = np.zeros((P, K, A))
            for i, o in enumerate(objs):
                t = o.sys.terms[q]
                ans[i, : o.n] = t.ans
                if q in o.w:
                    w[i, : t.n_local] = o.w[q]
                    y[i, : o.k, : t.n_local] = o.y[q]
            self.ans[q], self.w[q], self.y[q] = ans, w, y
        self.bq = bq
        H, B = self._normal(objs)
        self.lower: np.ndarray | None = None
        self.upper = np.zeros((P, K, 0))
        if self.split:
            A = self.w[bq].shape[1]
            self.lower = np.zeros((P, K, A))
            self.upper = np.full((P, K, A), np.inf)
            for i, o in enumerate(objs):
                m = o.sys.terms[bq].n_local
                self.lower[i, : o.k, :m] = o.lower
                if o.upper is not None:
                    self.upper[i, : o.k, :m] = o.upper
            self.upper[:, :, A - 1] = 0.0  # the padding slot: W = 0 there
        self.H, self.B = H, B
        # f at X = 0: the measured targets' weighted squares plus the objectives' constants
        self.f0 = self.const.copy()
        for q in self.queries:
            self.f0 += 0.5 * np.einsum("pa,pka->p", self.w[q], np.square(self.y[q]))
        # strong convexity of f (the certificate's mu): H >= min_cell w_detailed I when the
        # detailed query weighs every cell (the other terms are PSD); else the exact smallest
        # eigenvalue. The largest by Gershgorin (H >= 0 entrywise).
        self.mu = np.zeros(P)
        if "detailed" in self.queries:
            wd = np.take_along_axis(self.w["detailed"], self.ans["detailed"], axis=1)
            self.mu = np.where(self.dom > 0, wd, np.inf).min(axis=1)
        weak = ~(self.mu > 0)
        if weak.any():
            self.mu[weak] = np.maximum(np.linalg.eigvalsh(H[weak])[:, 0], 0.0)
        # curvature range that sets the initial rho: of H (bounds) or, with the splitting, of
        # the pencil (H, B) (exact: bounds from H alone start rho ~4x too high, ~2x iterations)
        if self.split:
            S = _inverse_sqrt_grouped(B)
            lam = np.linalg.eigvalsh(S @ H @ S)
            self.rho_range = (np.maximum(lam[:, 0], 0.0), lam[:, -1])
        else:
            self.rho_range = (self.mu, H.sum(axis=2).max(axis=1))
        self.Minv: np.ndarray = np.zeros_like(H)
        # certificate layout (certificate.CertificateOps)
        self.totals = self.t if self.has_t else None
        self.held = self.trows
        self.neg = np.where(self.allowed, 0.0, -np.inf)
        self._flat: dict[str, np.ndarray] = {}
        # last thresholds (P, n) of :meth:`project` per slot, for warm starts (:meth:`take`
        # keeps them aligned: it filters every dict of per-parent arrays)
        self.taus: dict[str, np.ndarray] = {}

    def _normal(self, objs: list[Objective]) -> tuple[np.ndarray, np.ndarray]:
        """The padded normal matrices ``H (P, n, n)`` and ``B = I (+ G'G)``.

        Real cells: ``operators.dense_normal_matrix`` of each parent (the same sums in the
        same query order, so the same numbers). Padded cells: decoupled, with a curvature no
        smaller than the real ones so the smallest eigenvalue (strong convexity) is a real
        cell's. One pass per query over the whole batch when the parents share their queries
        (padded cells carry weight 0 and an answer no real cell has: they add exact zeros)."""
        P, n = self.dom.shape
        real = self.dom > 0
        H = np.zeros((P, n, n))
        B = np.broadcast_to(np.eye(n), (P, n, n)).copy()
        if all(tuple(o.w) == self.queries for o in objs):
            # Where every real cell of the batch carries its query's one weight (the usual
            # case), the pairs sharing the query's answer set one bit of a 16-bit code per
            # cell pair and H is a table of the codes' weight sums, built by the same
            # additions in the same query order: the same numbers as one masked add of
            # (P, n, n) floats per query, with int16 compares instead (~5x fewer bytes).
            # Padded cells get answers no other cell has, so they pair with no one.
            code = np.zeros((P, n, n), dtype=np.uint16)
            table = np.zeros(1)
            pad_ans = -1 - np.arange(n)
            for q in self.queries:
                ans = self.ans[q]
                wc = np.take_along_axis(self.w[q], ans, axis=1)
                wr = wc[real]
                bit = int(np.log2(table.size))
                if (bit < 16 and wr.size and bool(np.all(wr == wr[0]))
                        and self.w[q].shape[1] < 1 << 15 and n < 1 << 15):
                    a = np.where(real, ans, pad_ans).astype(np.int16)
                    code += (a[:, :, None] == a[:, None, :]) * np.uint16(1 << bit)
                    table = np.concatenate([table, table + float(wr[0])])
                else:
                    # H += where(same answer, w, 0) (adding 0.0 elsewhere is a no-op)
                    np.add(H, wc[:, :, None], out=H, where=ans[:, :, None] == ans[:, None, :])
            if table.size > 1:
                H += table[code]
        else:
            for i, o in enumerate(objs):
                H[i, : o.n, : o.n] = dense_normal_matrix(o.sys, o.w)
        diag = np.diagonal(H, axis1=1, axis2=2)
        pad = np.maximum(np.where(real, diag, 0.0).max(axis=1, initial=0.0), 1.0)
        pi, pj = np.nonzero(~real)
        H[pi, pj, pj] = pad[pi]
        if self.split:
            a = self.ans[self.bq]
            B += (a[:, :, None] == a[:, None, :]) & real[:, :, None] & real[:, None, :]
        return H, B

    def refactor(self, rho: np.ndarray, which: np.ndarray) -> None:
        """``Minv = (H + rho B)^-1`` for parents ``which`` (bool (P,)) (:func:`spd_inverse`)."""
        if which.all():  # the common case: no boolean-index copies of the (P, n, n) stacks
            self.Minv = spd_inverse(self.H + rho[:, None, None] * self.B)
        elif which.any():
            self.Minv[which] = spd_inverse(self.H[which] + rho[which, None, None] * self.B[which])

    def take(self, keep: np.ndarray) -> None:
        """Keep only parents ``keep`` (bool ``(P,)``) in every per-parent array."""
        self._flat = {}  # flat answer indices: rebuilt for the new P
        for name, v in list(vars(self).items()):
            if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == keep.size:
                setattr(self, name, v[keep])
            elif isinstance(v, dict):
                setattr(self, name, {q: a[keep] for q, a in v.items()})

    # -- operators ---------------------------------------------------------------------------
    def _flat_answers(self, q: str, P: int, K: int) -> np.ndarray:
        """Flat index ``(p K + c) A_q + ans_q[p, j]`` of every entry (p, c, j), kept per query
        until parents leave."""
        idx = self._flat.get(q)
        if idx is None or idx.size != P * K * self.n:
            A = self.w[q].shape[1]
            idx = (np.arange(P * K).reshape(P, K, 1) * A + self.ans[q][:, None, :]).ravel()
            self._flat[q] = idx
        return idx

    def answer(self, q: str, X: np.ndarray) -> np.ndarray:
        """``Q_q X`` per parent and child: ``(P, K, A_q)``."""
        P, K, _ = X.shape
        A = self.w[q].shape[1]
        idx = self._flat_answers(q, P, K)
        return np.bincount(idx, weights=X.ravel(), minlength=P * K * A).reshape(P, K, A)

    def back(self, q: str, R: np.ndarray) -> np.ndarray:
        """``Q_q' R`` for ``R (P, K, A_q)`` -> ``(P, K, n)`` (a gather)."""
        P, K, _ = R.shape
        return R.reshape(-1)[self._flat_answers(q, P, K)].reshape(P, K, self.n)

    def minv(self, R: np.ndarray) -> np.ndarray:
        """``M_i^-1 r`` for every row r of parent i: ``R (P, m, n)`` (M symmetric)."""
        return R @ self.Minv

    def project(self, V: np.ndarray, slot: str = "iterate") -> np.ndarray:
        """C1 projection of every parent's ``(K, n)`` block, as one column projection.

        The first call sorts; later ones start Michelot's Newton iteration from the
        thresholds of the last call with the same ``slot`` (the loop's iterates, or the
        certificate's points: each moves little between calls) — 2-4x cheaper than a sort
        on these shapes, and as exact. The thresholds are ``(P, n)`` per-parent arrays, so
        :meth:`take` keeps them aligned with the parents still in the batch."""
        P, K, n = V.shape
        W3 = np.empty((K, P, n))
        np.add(V.transpose(1, 0, 2), self.neg.transpose(1, 0, 2), out=W3)  # -inf off allowed
        W = W3.reshape(K, P * n)
        tau = self.taus.get(slot)
        if tau is None:
            X, t = project_columns_sort(W, self.p.ravel(), self.allowed_cols())
        else:
            X, t = project_columns_warm(W, self.p.ravel(), tau.ravel())
        self.taus[slot] = t.reshape(P, n)
        return X.reshape(K, P, n).transpose(1, 0, 2)

    def allowed_cols(self) -> np.ndarray:
        """``allowed`` as the ``(K, P n)`` columns of :meth:`project`."""
        P, K, n = self.allowed.shape
        return self.allowed.transpose(1, 0, 2).reshape(K, P * n)

    def value_grad(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(f (P,), grad (P, K, n))`` per parent, constants included, through the normal
        matrices: ``grad = X H - b``, ``f = <X, H X / 2 - b> + y'Wy / 2 + const`` (one
        batched matmul instead of a segment sum and a gather per query; the certificate's
        gap is ``f - lb`` with ``lb`` built from this same ``f``, so the rounding of the
        constant cancels out of it)."""
        HX = X @ self.H  # H symmetric; zero rows (padding) stay zero
        g = HX - self.b
        HX *= 0.5
        HX -= self.b
        return self.f0 + np.einsum("pkn,pkn->p", X, HX), g


    # -- certificate layout -------------------------------------------------------------------
    def bound_answer(self, X: np.ndarray) -> np.ndarray:
        return self.answer(self.bq, X)

    def bound_back_add(self, R: np.ndarray, A: np.ndarray) -> np.ndarray:
        R -= self.back(self.bq, -A)
        return R

    def project_cert(self, V: np.ndarray, out: np.ndarray) -> np.ndarray:
        return self.project(V, "certificate")

    def scratch(self, i: int, like: np.ndarray) -> np.ndarray:
        return np.empty_like(like)  # small arrays: nothing to gain from keeping them

    def neg_mask(self) -> np.ndarray | None:
        return self.neg


class _Batch:
    """P small parents padded into one :class:`_Group`: whole-batch numpy passes, each
    parent's ``M_i`` inverted explicitly (:func:`spd_inverse`, once per change of its ``rho_i``),
    fresh (small) arrays per step, no repair (measured slower here, see BENCHMARKS.md).
    Certified parents leave the batch (:meth:`drop`), so the arrays shrink. The parents
    still open after ``_AA_BATCH_START`` iterations are accelerated (:class:`Anderson`, a
    history each) until ``_AA_BATCH_STOP``."""

    method = "admm-batch"

    def __init__(self, objs: list[Objective], anderson: int = 0):
        self.objs = objs
        self.G = _Group(objs)
        P = len(objs)
        self.idx = np.arange(P)  # original position of each parent still in the batch
        self.out: list[L2Result | None] = [None] * P
        self.rho = np.ones(P)
        self.anderson = anderson
        self.aa: Anderson | None = None

    def curvature(self) -> tuple[np.ndarray, np.ndarray]:
        # of f (bounds) or, with the splitting, of the pencil (H, B), as for one parent
        return self.G.rho_range

    def set_rho(self, rho: np.ndarray) -> None:
        self.rho = rho

    def _factors(self, which: np.ndarray) -> None:
        G = self.G
        G.refactor(self.rho, which)
        u = G.minv(G.dom[:, None, :])[:, 0, :] * G.dom
        self.u, self.s = u, u.sum(axis=1)

    def _xstep(self, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        G, u, s = self.G, self.u, self.s
        V = G.minv(R) * G.rows[:, :, None]
        V += ((G.p - V.sum(axis=1)) / G.k[:, None])[:, None, :] * G.rows[:, :, None]
        alpha = np.zeros((V.shape[0], G.K))
        if G.has_t:
            alpha = np.where(G.trows, (G.t - V.sum(axis=2)) / s[:, None], 0.0)
            V += alpha[:, :, None] * u[:, None, :]
        return V, alpha

    def start(self) -> None:
        G = self.G
        self._factors(np.ones(len(self.objs), dtype=bool))
        self.X, self.alpha = self._xstep(G.b.copy())
        self.Z = G.project(self.X)
        self.U = np.zeros_like(self.Z)
        self.W = self.U2 = np.zeros((0, 0, 0))
        if G.split:
            self.W = np.minimum(np.maximum(G.answer(G.bq, self.Z), cast(np.ndarray, G.lower)),
                                G.upper)
            self.U2 = np.zeros_like(self.W)
        self.iters = 0

    def _dr_point(self) -> np.ndarray:
        """``s = Z + U [, W + U2]`` per parent, flat ``(P, size)`` (:class:`Anderson`)."""
        P = self.Z.shape[0]
        s = (self.Z + self.U).reshape(P, -1)
        if self.G.split:
            s = np.concatenate([s, (self.W + self.U2).reshape(P, -1)], axis=1)
        return s

    def iterate(self, relax: float) -> None:
        G = self.G
        r3 = self.rho[:, None, None]
        R = G.b + r3 * (self.Z - self.U)
        if G.split:
            R += r3 * G.back(G.bq, self.W - self.U2)
        X, self.alpha = self._xstep(R)
        Xh = relax * X + (1.0 - relax) * self.Z
        self.Zold = self.Z
        if G.split:
            GXh = relax * G.answer(G.bq, X) + (1.0 - relax) * self.W
        self.X = X
        self.iters += 1
        if self.aa is not None and self.iters > _AA_BATCH_STOP:
            self.aa, self.anderson = None, 0  # Z, U are consistent: the plain loop goes on
        if self.aa is None and self.anderson and self.iters > _AA_BATCH_START:
            self.sv = self._dr_point()
            self.aa = Anderson(self.sv.shape[0], self.sv.shape[1], self.anderson)
        if self.aa is None:
            self.Z = G.project(Xh + self.U)
            self.U += Xh - self.Z
            if G.split:
                self.W = np.minimum(np.maximum(GXh + self.U2, cast(np.ndarray, G.lower)),
                                    G.upper)
                self.U2 += GXh - self.W
            return
        # accelerated: F(s) = (Xh + U [, GXh + U2]) extrapolated, then projected
        P, kn = Xh.shape[0], Xh[0].size
        F = (Xh + self.U).reshape(P, -1)
        if G.split:
            F = np.concatenate([F, (GXh + self.U2).reshape(P, -1)], axis=1)
        self.aa.step(F, self.sv)
        self.sv = F
        T = F[:, :kn].reshape(Xh.shape)
        self.Z = G.project(T)
        self.U = T - self.Z
        if G.split:
            T2 = F[:, kn:].reshape(self.U2.shape)
            self.W = np.minimum(np.maximum(T2, cast(np.ndarray, G.lower)), G.upper)
            self.U2 = T2 - self.W

    def check(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        G = self.G
        nu = None
        if G.split:
            nu = np.maximum(-self.rho[:, None, None] * self.U2, 0.0)
            nu[G.upper == 0.0] = 0.0  # forced-zero answers: Z is 0 there already
        f, grad = G.value_grad(self.Z)
        lb, spread, infeas = certificate(G, self.Z, f, grad, self.alpha, nu)
        gap = np.maximum(f - lb, 0.0)
        return f, lb, gap, spread, infeas

    def repair(self, open_: np.ndarray, f: np.ndarray, lb: np.ndarray, infeas: np.ndarray,
               tol: float, feas_tol: float, it: int) -> np.ndarray:
        return np.zeros(open_.shape, dtype=bool)

    def emit(self, done: np.ndarray, ok: np.ndarray, f: np.ndarray, gap: np.ndarray,
             spread: np.ndarray, infeas: np.ndarray, it: int) -> None:
        for j in np.flatnonzero(done):
            o = self.objs[self.idx[j]]
            self.out[self.idx[j]] = L2Result(
                self.Z[j, : o.k, : o.n].copy(), float(f[j]), float(gap[j]), float(spread[j]),
                float(infeas[j]), it, bool(ok[j]), self.method)

    def residuals(self, relax: float) -> tuple[np.ndarray, np.ndarray]:
        D = self.X - self.Z
        r = np.sqrt(np.einsum("pkn,pkn->p", D, D))
        dz = self.Z - self.Zold
        dual = self.rho * np.sqrt(np.einsum("pkn,pkn->p", dz, dz))
        return r, dual

    def drop(self, keep: np.ndarray) -> None:
        self.G.take(keep)
        self.idx, self.rho = self.idx[keep], self.rho[keep]
        self.Z, self.U, self.alpha, self.u = self.Z[keep], self.U[keep], self.alpha[keep], self.u[keep]
        self.s = self.u.sum(axis=1)
        if self.G.split:
            self.W, self.U2 = self.W[keep], self.U2[keep]
        if self.aa is not None:
            self.aa.take(keep)
            self.sv = self.sv[keep]

    def rescale(self, fac: np.ndarray) -> None:
        changed = fac != 1.0
        if changed.any():
            self.rho = self.rho * fac
            self.U /= fac[:, None, None]
            if self.G.split:
                self.U2 /= fac[:, None, None]
            self._factors(changed)
            if self.aa is not None:  # their maps changed: their histories no longer apply
                self.aa.forget(changed)
                self.sv = self._dr_point()

    def accelerated(self) -> np.ndarray:
        return np.full(self.idx.size, self.aa is not None)


def admm_batch(
    objs: list[Objective],
    tol: float = 1e-9,
    feas_tol: float = 1e-7,
    max_iter: int = 5000,
    relax: float = 1.6,
    check_every: int = 10,
    balance: float = 10.0,
    anderson: int = 8,
) -> list[L2Result]:
    """Solve every parent's least squares (``objs``, each with a parent) by batched ADMM.

    Same model, stopping rule, certificate and rho rules as :func:`admm` (``gap <= tol * f``
    and ``infeas <= feas_tol`` persons), one :class:`L2Result` per objective in input order
    (``Z`` on that objective's domain; ``certified=False`` if ``max_iter`` was hit).
    ``anderson``: history length of the acceleration (0: plain ADMM).
    """
    if any(not o.consistency for o in objs):
        raise ValueError("admm_batch needs parents (per-cell consistency); solve the root alone")
    out: list[L2Result | None] = [None] * len(objs)
    for split in (False, True):
        pos = [i for i, o in enumerate(objs) if (o.lower is not None) == split]
        if pos:
            lay = _Batch([objs[i] for i in pos], anderson)
            _run(lay, tol, feas_tol, max_iter, relax, check_every, balance)
            for i, r in zip(pos, lay.out):
                out[i] = r
    return out  # type: ignore[return-value]
