"""Batched accelerated projected gradient (FISTA + adaptive restart) for many small parents.

At the block level (children of a block group) the normal matrix is well conditioned
(kappa ~ 10) and the problems are tiny, so per-parent Python overhead dominates. Here P
parents are padded into ``(P, K, n)`` arrays (K = most children, n = largest free set; padded
children/cells are disallowed, so the projection keeps them at 0) and every FISTA step is a
handful of whole-batch numpy passes: ``H X`` by one bincount per query, and the exact per-cell
simplex projection by one sort over the child axis.

Scope: parents with consistency, no exact child totals, no held totals. Lower bounds are not
imposed here: a parent whose batched solution violates its bounds is returned as unsolved and
the caller solves it alone with ADMM (if it meets them, it is also optimal with them). Each
parent stops on its own strong-convexity certificate; the batch runs until all are certified
or ``max_iter`` (then the uncertified ones are returned as unsolved).
"""

from __future__ import annotations

import numpy as np

from pipeline.postprocess.objective import L2Objective
from pipeline.postprocess.problem import ParentProblem
from pipeline.postprocess.projection import project_columns_sort


class Batch:
    """Padded arrays of P parents' objectives (each an :class:`L2Objective` on its free cells)."""

    def __init__(self, objs: list[L2Objective]):
        self.objs = objs
        P = len(objs)
        self.P, self.K = P, max(o.k for o in objs)
        self.n = max(max(o.n for o in objs), 1)
        K, n = self.K, self.n
        self.allowed = np.zeros((P, K, n), dtype=bool)
        self.p = np.zeros((P, n))
        self.b = np.zeros((P, K, n))
        self.const = np.array([o.const_off for o in objs])
        self.queries = objs[0].queries
        self.ans: dict[str, np.ndarray] = {}
        self.A: dict[str, int] = {}
        self.w: dict[str, np.ndarray] = {}
        self.y: dict[str, np.ndarray] = {}
        for i, o in enumerate(objs):
            self.allowed[i, : o.k, : o.n] = o.allowed
            self.p[i, : o.n] = o.p
            self.b[i, : o.k, : o.n] = o.b
        for q in self.queries:
            A = max(o.sys.terms[q].n_local for o in objs) + 1  # last slot: padding cells
            ans = np.full((P, n), A - 1, dtype=np.int64)
            w = np.zeros((P, A))
            y = np.zeros((P, K, A))
            for i, o in enumerate(objs):
                t = o.sys.terms[q]
                ans[i, : o.n] = t.ans
                w[i, : t.n_local] = o.w[q]
                y[i, : o.k, : t.n_local] = o.y[q]
            self.ans[q], self.A[q], self.w[q], self.y[q] = ans, A, w, y
        # Gershgorin bound on lambda_max(H) per parent: max row sum of the non-negative H
        rows = np.zeros((P, n))
        for q in self.queries:
            cnt = np.zeros((P, self.A[q]))
            np.add.at(cnt, (np.arange(P)[:, None], self.ans[q]), (self.p > 0).astype(float))
            rows += np.take_along_axis(self.w[q] * cnt, self.ans[q], axis=1)
        self.L = np.maximum(rows.max(axis=1), 1e-12)
        # strong convexity: H >= w_detailed I when the detailed query weighs every cell
        self.mu = np.zeros(P)
        if "detailed" in self.queries:
            wd = np.take_along_axis(self.w["detailed"], self.ans["detailed"], axis=1)
            valid = np.arange(n)[None, :] < np.array([o.n for o in objs])[:, None]
            self.mu = np.where(valid, wd, np.inf).min(axis=1)
            self.mu = np.where(np.isfinite(self.mu), self.mu, 0.0)
        self._base = {q: (np.arange(P * K).reshape(P, K, 1) * self.A[q]) for q in self.queries}

    def _answer(self, q: str, X: np.ndarray) -> np.ndarray:
        idx = (self._base[q] + self.ans[q][:, None, :]).ravel()
        A = self.A[q]
        return np.bincount(idx, weights=X.ravel(), minlength=self.P * self.K * A).reshape(
            self.P, self.K, A)

    def _back(self, q: str, R: np.ndarray) -> np.ndarray:
        return np.take_along_axis(R, np.broadcast_to(self.ans[q][:, None, :], (self.P, self.K, self.n)), axis=2)

    def value_grad(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-parent objective ``(P,)`` and gradient ``(P, K, n)``."""
        f = self.const.copy()
        g = np.zeros_like(X)
        for q in self.queries:
            r = self._answer(q, X) - self.y[q]
            wr = self.w[q][:, None, :] * r
            f += 0.5 * np.einsum("pka,pka->p", wr, r)
            g += self._back(q, wr)
        return f, g

    def project(self, V: np.ndarray) -> np.ndarray:
        P, K, n = V.shape
        W = V.transpose(1, 0, 2).reshape(K, P * n)
        al = self.allowed.transpose(1, 0, 2).reshape(K, P * n)
        X, _ = project_columns_sort(W, self.p.ravel(), al)
        return X.reshape(K, P, n).transpose(1, 0, 2)

    def certificate(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per parent ``(f, upper bound on f - f*)`` at the C1-feasible X."""
        f, g = self.value_grad(X)
        mu = np.where(self.mu > 0, self.mu, 1.0)[:, None, None]
        S = self.project(X - g / mu)
        D = X - S
        bound = np.einsum("pkn,pkn->p", g, D) - 0.5 * self.mu * np.einsum("pkn,pkn->p", D, D)
        # where mu = 0 the Frank-Wolfe gap is the bound
        gm = np.where(self.allowed, g, np.inf).min(axis=1)
        fw = np.einsum("pkn,pkn->p", g, X) - np.sum(np.where(np.isfinite(gm), gm, 0.0) * self.p, axis=1)
        bound = np.where(self.mu > 0, bound, fw)
        return f, np.maximum(bound, 0.0)


def solve_batch(
    probs: list[ParentProblem], tol: float = 1e-9, max_iter: int = 2000, check_every: int = 5
) -> tuple[list[np.ndarray | None], list[dict]]:
    """FISTA on a batch of parents; returns per parent ``Z (k, n_cells)`` or None (unsolved)
    and per-parent info dicts (iterations, f, gap, variables, dropped)."""
    objs = [L2Objective(pr, tuple(pr.targets), pr.free_cells(), None, None) for pr in probs]
    B = Batch(objs)
    step = (1.0 / B.L)[:, None, None]
    X = B.project(B.b * step)
    Y = X.copy()
    t = np.ones(B.P)
    done = np.zeros(B.P, dtype=bool)
    iters = np.zeros(B.P, dtype=np.int64)
    f = gap = np.zeros(B.P)
    for it in range(1, max_iter + 1):
        _, g = B.value_grad(Y)
        Xn = B.project(Y - step * g)
        # adaptive restart (O'Donoghue & Candes 2015): momentum off where it points uphill
        up = np.einsum("pkn,pkn->p", g, Xn - X) > 0
        tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
        beta = np.where(up, 0.0, (t - 1) / tn)[:, None, None]
        tn = np.where(up, 1.0, tn)
        keep = done[:, None, None]
        Xn = np.where(keep, X, Xn)
        Y = np.where(keep, X, Xn + beta * (Xn - X))
        X, t = Xn, tn
        iters[~done] = it
        if it % check_every == 0 or it == max_iter:
            f, gap = B.certificate(X)
            done |= gap <= tol * np.maximum(f, 1e-300)
            if done.all():
                break
    out: list[np.ndarray | None] = []
    info = []
    for i, (pr, o) in enumerate(zip(probs, objs)):
        Z = np.zeros((pr.k, pr.spec.n_cells))
        Z[:, o.domain] = X[i, : o.k, : o.n]
        ok = bool(done[i])
        low = pr.lower_bounds()
        if ok and low is not None:
            ok = bool((pr.spec.query(pr.bound_query).answer(Z) >= low - 1e-9).all())
        out.append(Z if ok else None)
        info.append(dict(iterations=int(iters[i]), f=float(f[i]), gap=float(gap[i]),
                         variables=int(o.allowed.sum()), dropped=o.dropped))
    return out, info
