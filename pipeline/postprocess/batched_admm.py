"""Batched ADMM: the per-parent ADMM of ``least_squares.admm`` run on many small parents at once.

Small parents (block groups with their blocks, tracts with their block groups) cost little
arithmetic each; one at a time, their solve time is numpy call overhead (tens of iterations of
a dozen small calls). Here P parents are padded into ``(P, K, n)`` arrays (K = most children,
n = largest domain) and every ADMM iteration is a few whole-batch numpy passes:

- x-step: each parent's ``M_i = H_i + rho_i B_i`` (``B = I`` or ``I + G'G`` with the bound
  query's aggregation ``G``) is inverted explicitly, one batched ``inv`` per change of
  ``rho_i`` (a few per solve; an eigendecomposition costs ~9x an inverse and these solves take
  tens of iterations), so the step is one batched matrix product; the per-cell parent sums and
  exact / held child totals enter in closed form, exactly as in the one-parent x-step.
- z-step: the exact per-cell simplex projection of all parents as one column projection.
- lower bounds and forced-zero answers of the bound query: the ``G X = W`` splitting.

Padding is inert: padded cells have ``p = 0`` and no allowed child, padded children no allowed
cell, so the projection keeps them at 0, the block-diagonal ``M`` keeps them decoupled and
``u = M^-1 1`` is taken over real cells only. Each parent keeps its own ``rho`` (residual
balancing), stops on its own certificate (the bound of ``L2Objective.certificate`` computed
batch-wise) and leaves the batch when certified, so the arrays shrink as parents finish.
"""

from __future__ import annotations

import numpy as np

from pipeline.postprocess.least_squares import L2Result
from pipeline.postprocess.objective import L2Objective
from pipeline.postprocess.operators import dense_normal_matrix
from pipeline.postprocess.projection import project_columns_sort


class _Group:
    """Padded arrays of parents that share one splitting layout (all with ``G X = W`` or none)."""

    def __init__(self, objs: list[L2Objective]):
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
        H = np.zeros((P, n, n))
        B = np.broadcast_to(np.eye(n), (P, n, n)).copy()
        for i, o in enumerate(objs):
            self.rows[i, : o.k] = True
            self.allowed[i, : o.k, : o.n] = o.allowed
            self.dom[i, : o.n] = 1.0
            self.p[i, : o.n] = o.p
            self.b[i, : o.k, : o.n] = o.b
            if o.totals is not None:
                self.t[i, : o.k] = o.totals
                self.trows[i, : o.k] = True
            Hi = dense_normal_matrix(o.sys, o.w)
            H[i, : o.n, : o.n] = Hi
            # padded cells: decoupled, with a curvature no smaller than the real ones so the
            # smallest eigenvalue (strong convexity) is a real cell's
            pad = max(float(np.diag(Hi).max(initial=0.0)), 1.0)
            H[i, np.arange(o.n, n), np.arange(o.n, n)] = pad
            if self.split:
                a = o.sys.terms[bq].ans
                B[i, : o.n, : o.n] += a[:, None] == a[None, :]
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
        if self.split:
            A = self.w[bq].shape[1]
            self.bq = bq
            self.lower = np.zeros((P, K, A))
            self.upper = np.full((P, K, A), np.inf)
            for i, o in enumerate(objs):
                m = o.sys.terms[bq].n_local
                self.lower[i, : o.k, :m] = o.lower
                if o.upper is not None:
                    self.upper[i, : o.k, :m] = o.upper
            self.upper[:, :, A - 1] = 0.0  # the padding slot: W = 0 there
        self.H, self.B = H, B
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
            Li = np.linalg.inv(np.linalg.cholesky(B))
            lam = np.linalg.eigvalsh(Li @ H @ np.swapaxes(Li, 1, 2))
            self.rho_range = (np.maximum(lam[:, 0], 0.0), lam[:, -1])
        else:
            self.rho_range = (self.mu, H.sum(axis=2).max(axis=1))
        self.Minv = np.zeros_like(H)

    def refactor(self, rho: np.ndarray, which: np.ndarray) -> None:
        """``Minv = (H + rho B)^-1`` for parents ``which`` (bool (P,)): one batched inverse."""
        if which.all():  # the common case: no boolean-index copies of the (P, n, n) stacks
            self.Minv = np.linalg.inv(self.H + rho[:, None, None] * self.B)
        elif which.any():
            self.Minv[which] = np.linalg.inv(self.H[which] + rho[which, None, None] * self.B[which])

    def take(self, keep: np.ndarray) -> None:
        """Keep only parents ``keep`` (bool ``(P,)``) in every per-parent array."""
        for name, v in list(vars(self).items()):
            if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == keep.size:
                setattr(self, name, v[keep])
            elif isinstance(v, dict):
                setattr(self, name, {q: a[keep] for q, a in v.items()})

    # -- operators ---------------------------------------------------------------------------
    def answer(self, q: str, X: np.ndarray) -> np.ndarray:
        """``Q_q X`` per parent and child: ``(P, K, A_q)``."""
        P, K, n = X.shape
        A = self.w[q].shape[1]
        idx = (np.arange(P * K).reshape(P, K, 1) * A + self.ans[q][:, None, :]).ravel()
        return np.bincount(idx, weights=X.ravel(), minlength=P * K * A).reshape(P, K, A)

    def back(self, q: str, R: np.ndarray) -> np.ndarray:
        """``Q_q' R`` for ``R (P, K, A_q)`` -> ``(P, K, n)``."""
        P, K, _ = R.shape
        return np.take_along_axis(R, np.broadcast_to(self.ans[q][:, None, :], (P, K, self.n)), axis=2)

    def minv(self, R: np.ndarray) -> np.ndarray:
        """``M_i^-1 r`` for every row r of parent i: ``R (P, m, n)`` (M symmetric)."""
        return R @ self.Minv

    def project(self, V: np.ndarray) -> np.ndarray:
        P, K, n = V.shape
        W = V.transpose(1, 0, 2).reshape(K, P * n)
        al = self.allowed.transpose(1, 0, 2).reshape(K, P * n)
        X, _ = project_columns_sort(W, self.p.ravel(), al)
        return X.reshape(K, P, n).transpose(1, 0, 2)

    def value_grad(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self.const.copy()
        g = np.zeros_like(X)
        for q in self.queries:
            r = self.answer(q, X) - self.y[q]
            wr = self.w[q][:, None, :] * r
            f += 0.5 * np.einsum("pka,pka->p", wr, r)
            g += self.back(q, wr)
        return f, g


def _certificate(G: _Group, Z, alpha, nu):
    """Per parent ``(f, gap bound, KKT spread, infeasibility)``: ``L2Objective.certificate``
    and ``infeasibility`` on the batch."""
    f, grad = G.value_grad(Z)
    lag = f.copy()
    infeas = np.zeros(f.shape)
    if G.has_t:
        rs = Z.sum(axis=2) - G.t
        lag -= np.einsum("pk,pk->p", alpha, rs)
        grad = grad - alpha[:, :, None]
        infeas = np.abs(np.where(G.trows, rs, 0.0)).max(axis=1)
    if G.split:
        GZ = G.answer(G.bq, Z)
        lag -= np.einsum("pka,pka->p", nu, GZ - G.lower)
        grad = grad - G.back(G.bq, nu)
        infeas = np.maximum(infeas, np.max(G.lower - GZ, axis=(1, 2), initial=0.0))
    mu = G.mu
    safe = np.where(mu > 0, mu, 1.0)[:, None, None]
    S = G.project(Z - grad / safe)
    D = Z - S
    strong = np.einsum("pkn,pkn->p", grad, D) - 0.5 * mu * np.einsum("pkn,pkn->p", D, D)
    gm = np.where(G.allowed, grad, np.inf)
    low = gm.min(axis=1)
    fw = np.einsum("pkn,pkn->p", grad, Z) - np.sum(np.where(np.isfinite(low), low, 0.0) * G.p, axis=1)
    bound = np.maximum(np.where(mu > 0, strong, fw), 0.0) + (f - lag)
    gmax = np.where(Z > 0, grad, -np.inf).max(axis=1)
    spread = np.where(np.isfinite(gmax) & np.isfinite(low), gmax - low, 0.0).max(axis=1, initial=0.0)
    return f, np.maximum(bound, 0.0), spread, infeas


def _solve_group(objs: list[L2Objective], tol: float, feas_tol: float, max_iter: int,
                 relax: float, check_every: int) -> list[L2Result]:
    G = _Group(objs)
    P = len(objs)
    idx = np.arange(P)  # original position of each parent still in the batch
    out: list[L2Result | None] = [None] * P
    # rho from the curvature range of f, as in the one-parent solver (bounds, not eigenvalues)
    lo, hi = G.rho_range
    rho = np.where(hi > 0, np.sqrt(np.maximum(lo, 1e-12 * hi) * hi), 1.0)

    def factors(rho, which):
        G.refactor(rho, which)
        u = G.minv(G.dom[:, None, :])[:, 0, :] * G.dom
        return u, u.sum(axis=1)

    def xstep(R, u, s):
        V = G.minv(R) * G.rows[:, :, None]
        V += ((G.p - V.sum(axis=1)) / G.k[:, None])[:, None, :] * G.rows[:, :, None]
        alpha = np.zeros((V.shape[0], G.K))
        if G.has_t:
            alpha = np.where(G.trows, (G.t - V.sum(axis=2)) / s[:, None], 0.0)
            V += alpha[:, :, None] * u[:, None, :]
        return V, alpha

    u, s = factors(rho, np.ones(P, dtype=bool))
    X, alpha = xstep(G.b.copy(), u, s)
    Z = G.project(X)
    U = np.zeros_like(Z)
    if G.split:
        W = np.minimum(np.maximum(G.answer(G.bq, Z), G.lower), G.upper)
        U2 = np.zeros_like(W)
    it = 0
    for it in range(1, max_iter + 1):
        r3 = rho[:, None, None]
        R = G.b + r3 * (Z - U)
        if G.split:
            R += r3 * G.back(G.bq, W - U2)
        X, alpha = xstep(R, u, s)
        Xh = relax * X + (1.0 - relax) * Z
        Zold = Z
        Z = G.project(Xh + U)
        U += Xh - Z
        if G.split:
            GXh = relax * G.answer(G.bq, X) + (1.0 - relax) * W
            W = np.minimum(np.maximum(GXh + U2, G.lower), G.upper)
            U2 += GXh - W
        if it % check_every and it != max_iter:
            continue
        nu = None
        if G.split:
            nu = np.maximum(-r3 * U2, 0.0)
            nu[G.upper == 0.0] = 0.0  # forced-zero answers: Z is 0 there already
        f, gap, spread, infeas = _certificate(G, Z, alpha, nu)
        done = (gap <= tol * np.maximum(f, 1e-300)) & (infeas <= feas_tol)
        if it == max_iter:
            done[:] = True
        for j in np.flatnonzero(done):
            o = objs[idx[j]]
            certified = bool(gap[j] <= tol * max(f[j], 1e-300) and infeas[j] <= feas_tol)
            out[idx[j]] = L2Result(Z[j, : o.k, : o.n].copy(), float(f[j]), float(gap[j]),
                                   float(spread[j]), float(infeas[j]), it, certified, "admm-batch")
        if done.all():
            break
        # residual balancing per parent (Boyd et al. 2011, 3.4.1)
        r = np.sqrt(np.einsum("pkn,pkn->p", X - Z, X - Z))
        dz = Z - Zold
        dual = rho * np.sqrt(np.einsum("pkn,pkn->p", dz, dz))
        fac = np.where(r > 10 * dual, 2.0, np.where(dual > 10 * r, 0.5, 1.0))
        keep = ~done
        if done.any():
            G.take(keep)
            idx, rho, fac = idx[keep], rho[keep], fac[keep]
            Z, U, alpha, u = Z[keep], U[keep], alpha[keep], u[keep]
            s = u.sum(axis=1)
            if G.split:
                W, U2 = W[keep], U2[keep]
        changed = fac != 1.0
        if changed.any():
            rho = rho * fac
            U /= fac[:, None, None]
            if G.split:
                U2 /= fac[:, None, None]
            u, s = factors(rho, changed)
    return out  # type: ignore[return-value]


def admm_batch(
    objs: list[L2Objective],
    tol: float = 1e-9,
    feas_tol: float = 1e-7,
    max_iter: int = 5000,
    relax: float = 1.6,
    check_every: int = 10,
) -> list[L2Result]:
    """Solve every parent's least squares (``objs``, each with a parent) by batched ADMM.

    Same model, stopping rule and certificate as :func:`least_squares.admm` (``gap <= tol * f``
    and ``infeas <= feas_tol`` persons), one :class:`L2Result` per objective in input order
    (``Z`` on that objective's domain; ``certified=False`` if ``max_iter`` was hit).
    """
    if any(not o.consistency for o in objs):
        raise ValueError("admm_batch needs parents (per-cell consistency); solve the root alone")
    out: list[L2Result | None] = [None] * len(objs)
    for split in (False, True):
        pos = [i for i, o in enumerate(objs) if (o.lower is not None) == split]
        if pos:
            res = _solve_group([objs[i] for i in pos], tol, feas_tol, max_iter, relax, check_every)
            for i, r in zip(pos, res):
                out[i] = r
    return out  # type: ignore[return-value]
