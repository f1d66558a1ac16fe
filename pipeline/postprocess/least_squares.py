"""Weighted least squares with exact constraints: ADMM with an exact structured x-step.

Splitting ``min f(X) + I_C1(Z) [+ I_box(W)]`` s.t. ``X = Z`` [and ``G X = W`` for lower
bounds ``G x_c >= l_c`` on one query]. The x-step minimises the augmented Lagrangian exactly,
including the linear constraints ``sum_c x_c = p`` and ``1'x_c = t_c`` in closed form, because
every child shares ``M = H + rho I (+ rho G'G)`` (notes section 3.3):
``v_c = M^-1 r_c``, ``mu = (p - sum_c v_c)/k``, ``alpha_c = (t_c - 1'(v_c + mu))/s``,
``x_c = v_c + mu + alpha_c u`` with ``u = M^-1 1`` and ``s = 1'u``. ``M^-1`` is either a dense
(generalised) eigendecomposition on the free cells or the Kronecker inverse on the full grid.
The z-step is the exact per-cell simplex projection, so every returned Z meets x >= 0 and the
parent sums to rounding error whatever the tolerance; the loop stops on a certificate. With
held child totals the iterate's row sums lag far behind its optimality, so a check may instead
certify the iterate moved onto the totals (:func:`_repair`). Large parents: the loop works on
reused (k, n) arrays and warm-starts the projection (``objective.project_inplace``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from pipeline.postprocess.kron import KronInverse
from pipeline.postprocess.objective import L2Objective
from pipeline.postprocess.operators import dense_normal_matrix
from pipeline.postprocess.projection import fit_row_col_offsets, fix_row_sums

# attempt the repair when the first-order estimate of the repaired gap is within this factor
# of the target (the estimate is pessimistic: on 300-3,000-child parents the repaired gap was
# 2-4x below it, and waiting for estimate <= target cost 20-50 % more iterations)
_REPAIR_GATE = 3.0
_INPLACE_MIN = 20_000  # k * n from which the x-step correction is one in-place dgemm


class DenseInverse:
    """``(H + rho B)^-1`` on the domain with ``B = I (+ G'G)``, by one generalised eigh."""

    def __init__(self, obj: L2Objective):
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

    def __init__(self, obj: L2Objective, weights: dict[str, float]):
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


@dataclass
class L2Result:
    """Solution on the domain plus its certificate.

    ``Z`` (k, n_domain) is C1-feasible; ``gap`` bounds ``f(Z) - f*`` from above (persons^2 /
    variance units, same scale as ``f``); ``infeas`` is the largest violation of row totals /
    lower bounds (persons); ``certified`` says the stopping rule was met. ``state``: the
    ADMM iterate (``Z``, scaled dual ``U``, ``rho``, projection thresholds ``tau``) for a warm
    start of a related solve on the same children and domain (:func:`admm` ``warm``).
    """

    Z: np.ndarray
    f: float
    gap: float
    spread: float
    infeas: float
    iterations: int
    certified: bool
    method: str
    state: dict | None = None


def _xstep(obj: L2Objective, inv, R: np.ndarray, u: np.ndarray, s: float,
           out: np.ndarray | None = None):
    """x-step ``M^-1 R`` plus the closed-form consistency / row-total corrections (module
    docstring); ``out`` (k, n) optionally receives X. Returns ``(X, alpha or None)``."""
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
    if V.size < _INPLACE_MIN:  # small parents: fewer numpy calls beat fewer passes
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


def admm(
    obj: L2Objective,
    inv,
    tol: float = 1e-9,
    feas_tol: float = 1e-7,
    max_iter: int = 5000,
    relax: float = 1.6,
    check_every: int = 10,
    method: str = "admm",
    balance: float = 10.0,
    warm: L2Result | None = None,
    keep_state: bool = False,
) -> L2Result:
    """Solve the parent's least squares by ADMM; stop when ``gap <= tol * f`` and
    ``infeas <= feas_tol``. If ``max_iter`` is hit the result has ``certified=False``.

    ``balance``: rho is doubled / halved when the primal and dual residuals differ by more
    than this factor (checked every ``check_every`` iterations). With held child totals the
    row sums of the C1 iterate converge slowly while the iterate is already near-optimal, so
    at a check that is optimal but not yet feasible enough, the iterate is moved onto the
    totals (:func:`_repair`) and certified there instead.

    ``warm``: a result of an earlier solve of the same parent (same children and domain, e.g.
    without the lower bounds); its iterate, dual and rho are the starting point. Any start
    converges to the same certified optimum; a near one saves iterations. ``keep_state``:
    return that state in ``L2Result.state`` (off by default: it holds two more (k, n) arrays).
    """
    k, n = obj.k, obj.n
    obj.mu = inv.mu
    lo, hi = inv.eig_range()
    rho = float(np.sqrt(max(lo, 1e-12 * hi) * hi)) if hi > 0 else 1.0
    inv.set_rho(rho)
    has_low = obj.lower is not None
    can_repair = obj.totals is not None and obj.consistency and k > 1

    def ones_solve() -> tuple[np.ndarray, float]:
        u = inv.apply(np.ones((1, n)))[0]
        return u, float(u.sum())

    tau = None  # projection thresholds of the last z-step (warm start)
    st = warm.state if warm is not None else None
    if st is not None and st["Z"].shape == (k, n):
        rho = float(st["rho"])
        inv.set_rho(rho)
        u, s = ones_solve()
        Z, U, tau = st["Z"].copy(), st["U"].copy(), st["tau"]
        X = np.empty_like(Z)
    else:
        u, s = ones_solve()
        X, alpha = _xstep(obj, inv, obj.b.copy(), u, s)
        Z = obj.project(X)
        U = np.zeros_like(Z)
    if has_low:
        W = np.maximum(obj.bound_answer(Z), obj.lower)
        if obj.upper is not None:
            W = np.minimum(W, obj.upper)
        U2 = np.zeros_like(W)
        if st is not None and st.get("U2") is not None and st["U2"].shape == U2.shape:
            U2 = st["U2"].copy()  # e.g. the duals of the forced-zero answers
    # (k, n) work arrays, reused: fresh large temporaries cost page faults on every iteration
    R = np.empty_like(Z)
    T = np.empty_like(Z)
    Zold = np.empty_like(Z)
    def state() -> dict | None:
        if not keep_state:
            return None
        return dict(Z=Z, U=U, U2=U2 if has_low else None, rho=rho, tau=tau)

    f, gap, spread, infeas = np.inf, np.inf, np.inf, np.inf
    it = 0
    for it in range(1, max_iter + 1):
        np.subtract(Z, U, out=R)  # R = b + rho (Z - U) [+ rho G'(W - U2)]
        R *= rho
        R += obj.b
        if has_low:
            obj.bound_back_add(R, rho * (W - U2))
        X, alpha = _xstep(obj, inv, R, u, s, out=X)
        if has_low:
            GXh = relax * obj.bound_answer(X) + (1.0 - relax) * W
        X *= relax  # X <- relaxed Xh = relax X + (1 - relax) Z
        np.multiply(Z, 1.0 - relax, out=T)
        X += T
        np.add(X, U, out=T)
        Z, Zold = Zold, Z
        Z, tau = obj.project_inplace(T, Z, tau)
        U += X
        U -= Z
        if has_low:
            W = np.maximum(GXh + U2, obj.lower)
            if obj.upper is not None:
                W = np.minimum(W, obj.upper)
            U2 += GXh - W
        if it % check_every == 0 or it == max_iter:
            nu = np.maximum(-rho * U2, 0.0) if has_low else None
            if nu is not None and obj.upper is not None:
                nu[obj.upper == 0.0] = 0.0  # forced-zero answers: Z is 0 there already
            f, grad = obj.value_grad(Z)
            lb, spread = obj.lower_bound(Z, f, grad, alpha, nu)
            gap = max(f - lb, 0.0)
            infeas = obj.infeasibility(Z)
            if gap <= tol * max(f, 1e-300) and infeas <= feas_tol:
                return L2Result(Z, f, gap, spread, infeas, it, True, method, state())
            if can_repair and infeas > feas_tol:
                # first-order value of f at the repaired point: f + alpha'(t - Z 1)
                pred = f + float(np.sum(alpha * (obj.totals - Z.sum(axis=1))))
                if pred - lb <= _REPAIR_GATE * tol * max(f, 1e-300):
                    res = _repair(obj, Z, lb, alpha, nu, tol, feas_tol, it, method)
                    if res is not None:
                        res.state = state()
                        return res
            np.subtract(X, Z, out=T)
            r = float(np.linalg.norm(T)) / relax  # X - Z = (Xh - Z) / relax
            np.subtract(Z, Zold, out=T)
            dual = rho * float(np.linalg.norm(T))
            if r > balance * dual or dual > balance * r:  # residual balancing (Boyd 2011, 3.4.1)
                fac = 2.0 if r > balance * dual else 0.5
                rho *= fac
                U /= fac
                if has_low:
                    U2 /= fac
                inv.set_rho(rho)
                u, s = ones_solve()
    return L2Result(Z, f, gap, spread, infeas, it, False, method, state())


def _repair(obj: L2Objective, Z: np.ndarray, lb: float, alpha, nu, tol: float,
            feas_tol: float, it: int, method: str) -> L2Result | None:
    """Certify a point near the C1 iterate ``Z`` that meets the held totals, or None.

    ``Z`` is moved onto the row totals by support corrections (:func:`fix_row_sums`) and
    re-projected onto C1 (exact column sums, x >= 0, zeros), so it stays C1-feasible. Lower
    bounds on f* are valid from any C1 point: the best of the one at ``Z`` (``lb``), the one at
    the repaired point with the ADMM multipliers and, for the linear bound (mu = 0), the one
    with row multipliers refitted on the repaired point's support (``fit_row_col_offsets``).
    """
    Zr = fix_row_sums(Z, obj.p, obj.totals)
    # Zr is C1 up to rounding (clipped corrections): an exact projection, warm-started at
    # tau = 0 (the threshold of a point already in C1), makes it C1 to working precision
    Zr, _ = obj.project_inplace(Zr.copy(), Zr, np.zeros(obj.n))
    infeas = obj.infeasibility(Zr)
    if infeas > feas_tol:
        return None
    f, grad = obj.value_grad(Zr)
    lb2, spread = obj.lower_bound(Zr, f, grad, alpha, nu)
    lb = max(lb, lb2)
    if f - lb > tol * max(f, 1e-300) and obj.mu == 0:
        # the linear (mu = 0) bound needs accurate multipliers: refit them on Zr's support
        G = grad if nu is None else grad - obj.bound_back(nu)
        a, _ = fit_row_col_offsets(Zr, G)
        lb = max(lb, obj.lower_bound(Zr, f, grad, a, nu)[0])
    gap = max(f - lb, 0.0)
    if gap > tol * max(f, 1e-300):
        return None
    return L2Result(Zr, f, gap, spread, infeas, it, True, method)


def choose_inverse(obj: L2Objective, kron_min_cells: int = 600):
    """Kronecker inverse when the domain is the full grid with uniform weights, else dense."""
    weights = obj.uniform_weights()
    if obj.n == obj.prob.spec.n_cells and weights is not None and obj.n >= kron_min_cells:
        try:
            return KronXInverse(obj, weights), "admm-kron"
        except ValueError:
            pass
    return DenseInverse(obj), "admm-eig"
