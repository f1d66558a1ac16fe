"""The weighted least-squares objective of one parent on a cell domain, and its certificate.

``f(X) = 1/2 sum_q w_q sum_c sum_a m_qca ((Q_q x_c)_a - y_qca)^2`` with ``w_q = 1/v_q`` and
``m = 1`` where measured. All children of a parent share the per-answer weights (answers
measured for some but not all children of a parent are dropped for all of them and counted),
so they share one normal matrix ``H``. Constraint set handled by the projection ("C1"):
``X >= 0``, ``X = 0`` off ``allowed``, and (with a parent) ``sum_c X[:, j] = p_j``; exact child
totals and lower bounds on a query are handled by Lagrange multipliers in the certificate.
"""

from __future__ import annotations

import numpy as np

from pipeline.postprocess.kron import KronInverse
from pipeline.postprocess.operators import QuerySystem
from pipeline.postprocess.problem import ParentProblem
from pipeline.postprocess.projection import project_columns_sort, project_columns_warm

_FAST_HESS_MIN = 100_000  # k * n from which value_grad uses the Kronecker H (full grid)
# k * n from which the warm Newton projection beats one sort call (its ~15 numpy calls per
# step cost more than the sort on small parents)
_WARM_PROJECTION_MIN = 20_000


class L2Objective:
    """Objective data of one parent restricted to ``domain`` (sorted cell ids).

    ``queries``: the query names in this pass; ``totals``: float ``(k,)`` row constraints or
    None; ``lower``: float ``(k, n_answers(bound_query))`` or None.
    """

    def __init__(
        self,
        prob: ParentProblem,
        queries: tuple[str, ...],
        domain: np.ndarray,
        totals: np.ndarray | None,
        lower: np.ndarray | None,
    ):
        self.prob = prob
        self.k = prob.k
        self.domain = np.asarray(domain, dtype=np.int64)
        self.n = self.domain.size
        self.queries = tuple(queries)
        # per-child zeros on the bound query also go into the G X = W splitting when child
        # totals are held: the x-step then sees them (otherwise only the z-step does, and the
        # held totals converge slowly)
        zero_split = (totals is not None and prob.zero_answers is not None
                      and prob.allowed_mask is None and prob.zero_query == prob.bound_query
                      and bool(np.any(prob.zero_answers)))
        split = lower is not None or zero_split
        names = self.queries + ((prob.bound_query,) if split else ())
        self.sys = QuerySystem(prob.spec, self.domain, tuple(dict.fromkeys(names)))
        self.allowed = prob.allowed(self.domain)
        # masking costs several passes per projection: skip it when every entry is allowed
        self._mask = None if self.allowed.all() else self.allowed
        live = self.allowed.any(axis=0)  # cells that may be non-zero for some child
        self.w: dict[str, np.ndarray] = {}  # per-answer weights (n_local,)
        self.y: dict[str, np.ndarray] = {}  # (k, n_local), 0 where unmeasured
        self.dropped = 0
        off_total = 0.0
        for q in self.queries:
            yl, m, off = self.sys.local_targets(q, prob.targets[q])
            wq = 1.0 / float(prob.variances[q])
            # an answer without a live cell has Q x = 0 on C1, so its term is a constant:
            # weighting it with target 0 keeps the weights uniform (Kronecker path)
            dead = np.bincount(self.sys.terms[q].ans, weights=live, minlength=yl.shape[1]) == 0
            full = m.all(axis=0) & ~dead
            self.dropped += int((m.any(axis=0) & ~m.all(axis=0) & ~dead).sum())
            self.w[q] = wq * (full | dead)
            self.y[q] = np.where(full[None, :], yl, 0.0)
            off += float(np.sum(np.where(dead[None, :], yl, 0.0) ** 2))
            off_total += wq * off
        # terms of answers with no domain cell are constants (Q x = 0 there)
        self.const_off = 0.5 * off_total
        self.b = np.zeros((self.k, self.n))
        for q in self.queries:
            self.b += self.sys.back(q, self.w[q][None, :] * self.y[q])
        self.p = prob.parent_float()[self.domain]
        self.consistency = prob.has_parent
        self.totals = None if totals is None else np.asarray(totals, dtype=np.float64)
        self.lower = None
        self.upper = None
        if split:
            t = self.sys.terms[prob.bound_query]
            self.lower = (np.zeros((self.k, t.n_local)) if lower is None
                          else np.asarray(lower, dtype=np.float64)[:, t.answers])
            if zero_split:
                z = np.asarray(prob.zero_answers, dtype=bool)[:, t.answers]
                self.upper = np.where(z, 0.0, np.inf)
        self.mu = 0.0  # strong-convexity modulus of f on the domain, set by the solver
        self._neg: np.ndarray | None = None  # 0 / -inf on allowed / other entries (lazy)
        self._bq_starts: np.ndarray | None = None  # bound-query answer runs (lazy)
        self._bq_checked = False
        self._lb_tau: np.ndarray | None = None  # thresholds of the last certificate projection
        self._kron: KronInverse | None = None  # fast H on the full grid (lazy)
        self._kron_checked = False
        self._c0 = 0.0
        self._work: list[np.ndarray] = []  # (k, n) work arrays of lower_bound

    def uniform_weights(self) -> dict[str, float] | None:
        """Per-query scalar weights if every answer carries its query's weight, else None."""
        out = {}
        for q in self.queries:
            wq = 1.0 / float(self.prob.variances[q])
            if not np.all(self.w[q] == wq):
                return None
            out[q] = wq
        return out

    # -- objective ---------------------------------------------------------------------------
    def hess_apply(self, X: np.ndarray) -> np.ndarray:
        """``H X`` for X (k, n)."""
        out = np.zeros_like(X)
        for q in self.queries:
            out += self.sys.back(q, self.w[q][None, :] * self.sys.answer(q, X))
        return out

    def _fast_hess(self) -> KronInverse | None:
        """Kronecker ``H`` on the full grid with uniform weights for large parents (one
        structured pass instead of a segment sum per query), else None."""
        if not self._kron_checked:
            self._kron_checked = True
            weights = self.uniform_weights()
            if (self.n == self.prob.spec.n_cells and weights is not None
                    and self.k * self.n >= _FAST_HESS_MIN):
                try:
                    self._kron = KronInverse(self.prob.spec, weights)
                except ValueError:
                    self._kron = None
                self._c0 = 0.5 * sum(float(np.sum(self.w[q][None, :] * self.y[q] ** 2))
                                     for q in self.queries) + self.const_off
        return self._kron

    def value_grad(self, X: np.ndarray) -> tuple[float, np.ndarray]:
        """``(f(X), grad f(X))`` including the constant terms.

        On large full-grid parents ``grad = H X - b`` with the Kronecker ``H`` and
        ``f = <X, H X/2 - b> + c0``; the expanded form loses nothing here because ``c0``
        (the value at X = 0) is of the size of f itself, not of a large cancelling sum.
        """
        kron = self._fast_hess()
        if kron is not None:
            g = kron.forward(X)
            g -= self.b
            f = 0.5 * (float(np.vdot(X, g)) - float(np.vdot(X, self.b))) + self._c0
            return f, g
        f = 0.0
        g = np.zeros_like(X)
        for q in self.queries:
            r = self.sys.answer(q, X) - self.y[q]
            wr = self.w[q][None, :] * r
            f += float(np.sum(wr * r))
            g += self.sys.back(q, wr)
        return 0.5 * f + self.const_off, g

    def value(self, X: np.ndarray) -> float:
        return self.value_grad(X)[0]

    # -- constraints -------------------------------------------------------------------------
    def project(self, V: np.ndarray) -> np.ndarray:
        """Euclidean projection onto C1 (non-negativity, zeros, per-cell parent sums)."""
        if self.consistency:
            return project_columns_sort(V, self.p, self._mask)[0]
        return np.where(self.allowed, np.maximum(V, 0.0), 0.0)

    def _scratch(self, i: int) -> np.ndarray:
        """(k, n) float64 work array number i, kept on the objective."""
        while len(self._work) <= i:
            self._work.append(np.empty((self.k, self.n)))
        return self._work[i]

    def _neg_mask(self) -> np.ndarray:
        """0 on allowed entries, -inf elsewhere (added to a point before the projection)."""
        if self._neg is None:
            self._neg = np.where(self.allowed, 0.0, -np.inf)
        return self._neg

    def project_inplace(
        self, V: np.ndarray, out: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`project` for the ADMM loop: ``V`` (k, n) is scratch (overwritten), the
        result goes to ``out``; ``tau`` (n,) warm-starts the per-cell thresholds (None: cold,
        by sorting). Returns ``(out, tau)``; same projection as :meth:`project`."""
        if not self.consistency:
            np.maximum(V, 0.0, out=out)
            if self._mask is not None:
                out *= self._mask
            return out, None
        if tau is None or V.size < _WARM_PROJECTION_MIN:
            X, tau = project_columns_sort(V, self.p, self._mask)
            out[...] = X
            return out, tau
        if self._mask is not None:
            V += self._neg_mask()
        return project_columns_warm(V, self.p, tau, out=out)

    def _bound_groups(self) -> np.ndarray | None:
        """Start of each answer's cell run when the bound query's answers are contiguous
        runs of the (sorted) domain, as for hhgq, the slowest PL94 axis; else None."""
        if not self._bq_checked:
            self._bq_checked = True
            ans = self.sys.terms[self.prob.bound_query].ans
            if ans.size and bool(np.all(np.diff(ans) >= 0)):
                self._bq_starts = np.flatnonzero(np.r_[True, np.diff(ans) > 0])
        return self._bq_starts

    def bound_answer(self, X: np.ndarray) -> np.ndarray:
        """``G X`` (k, n_local answers of the bound query)."""
        starts = self._bound_groups()
        if starts is not None and X.shape[1] == self.n:
            return np.add.reduceat(X, starts, axis=1)
        return self.sys.answer(self.prob.bound_query, X)

    def bound_back(self, A: np.ndarray) -> np.ndarray:
        """``G' A`` (k, n)."""
        return self.sys.back(self.prob.bound_query, A)

    def bound_back_add(self, R: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``R += G' A`` in place (no (k, n) temporary when the answers are cell runs)."""
        starts = self._bound_groups()
        if starts is None or R.size < _WARM_PROJECTION_MIN:  # small: one gather is cheaper
            R += self.bound_back(A)
            return R
        ends = np.r_[starts[1:], self.n]
        size = ends - starts
        if R.flags.c_contiguous and np.all(size == size[0]):  # equal runs: one broadcast
            R.reshape(R.shape[0], starts.size, int(size[0]))[...] += A[:, :, None]
            return R
        for i, (a, b) in enumerate(zip(starts, ends)):
            R[:, a:b] += A[:, i:i + 1]
        return R

    def infeasibility(self, Z: np.ndarray) -> float:
        """Largest violation of the row totals and lower bounds at Z (persons)."""
        v = 0.0
        if self.totals is not None:
            v = max(v, float(np.abs(Z.sum(axis=1) - self.totals).max(initial=0.0)))
        if self.lower is not None:
            v = max(v, float(np.max(self.lower - self.bound_answer(Z), initial=0.0)))
        return v

    def certificate(
        self, Z: np.ndarray, alpha: np.ndarray | None, nu: np.ndarray | None
    ) -> tuple[float, float, float]:
        """Suboptimality certificate at a C1-feasible ``Z``.

        With Lagrangian ``g = f - sum alpha_c (1'z_c - t_c) - sum nu (G z - l)`` (nu >= 0),
        ``f* >= g* >= g(Z) - max_S [<grad g, Z - S> - mu/2 |Z - S|^2]`` over S in C1, the max
        attained at ``S = Proj_C1(Z - grad g / mu)`` (Frank-Wolfe vertex when mu = 0).
        Returns ``(f(Z), upper bound on f(Z) - f*, KKT spread)``; the spread is
        ``max_j (max_{c: z_cj > 0} grad_cj - min_{c allowed} grad_cj)``, 0 at a KKT point.
        """
        f, grad = self.value_grad(Z)
        lb, spread = self.lower_bound(Z, f, grad, alpha, nu)
        return f, max(f - lb, 0.0), spread

    def lower_bound(
        self, Z: np.ndarray, f: float, grad: np.ndarray, alpha: np.ndarray | None,
        nu: np.ndarray | None,
    ) -> tuple[float, float]:
        """``(lower bound on f*, KKT spread)`` from a C1-feasible ``Z`` with ``(f, grad) =
        value_grad(Z)`` and any multipliers ``alpha`` (k,) / ``nu >= 0`` (see
        :meth:`certificate`). Valid for every C1 point, also one whose row totals or lower
        bounds are not met yet."""
        g = f
        # the Lagrangian gradient goes to a work array kept on the objective (large parents:
        # fresh (k, n) temporaries page-fault on every check)
        G = self._scratch(0)
        np.copyto(G, grad)
        if alpha is not None and self.totals is not None:
            g -= float(np.sum(alpha * (Z.sum(axis=1) - self.totals)))
            G -= alpha[:, None]
        if nu is not None and self.lower is not None:
            g -= float(np.sum(nu * (self.bound_answer(Z) - self.lower)))
            self.bound_back_add(G, -nu)
        if self.mu > 0:
            V = self._scratch(1)
            np.multiply(G, -1.0 / self.mu, out=V)
            V += Z
            # exact projection; warm-started from the previous bound's thresholds (the
            # points of successive checks are close), by sorting the first time
            S, self._lb_tau = self.project_inplace(V, self._scratch(2), self._lb_tau)
            D = np.subtract(Z, S, out=self._scratch(1))
            bound = float(np.vdot(G, D)) - 0.5 * self.mu * float(np.vdot(D, D))
        else:
            gm = np.where(self.allowed, G, np.inf)
            if self.consistency:
                low = gm.min(axis=0, initial=np.inf)
                low = np.where(np.isfinite(low), low, 0.0)
                bound = float(np.vdot(G, Z)) - float(np.sum(low * self.p))
            elif np.any(G[self.allowed] < 0):
                bound = np.inf  # min of a linear function over the orthant is unbounded
            else:
                bound = float(np.vdot(G, Z))
        lb = g - max(bound, 0.0)
        if self.consistency and self.k:
            # min over allowed / max over the support of G per cell, via +-inf work arrays
            W = self._scratch(1)
            if self._mask is None:
                gmin = G.min(axis=0)
            else:
                np.subtract(G, self._neg_mask(), out=W)  # +inf off allowed
                gmin = W.min(axis=0)
            np.copyto(W, G)
            W[Z <= 0] = -np.inf
            gmax = W.max(axis=0)
            spread = float(np.max(np.where(np.isfinite(gmax), gmax - gmin, 0.0), initial=0.0))
        else:
            spread = float(np.max(np.where(Z > 0, np.abs(G), 0.0), initial=0.0))
        return lb, spread
