"""The weighted least-squares objective of one parent on a cell domain (a value), and results.

``f(X) = 1/2 sum_q w_q sum_c sum_a m_qca ((Q_q x_c)_a - y_qca)^2`` with ``w_q = 1/v_q`` and
``m = 1`` where measured. All children of a parent share the per-answer weights (answers
measured for some but not all children of a parent are dropped for all of them and counted),
so they share one normal matrix ``H``. Constraint set handled by the projection ("C1"):
``X >= 0``, ``X = 0`` off ``allowed``, and (with a parent) ``sum_c X[:, j] = p_j``; exact child
totals and lower bounds on a query are handled by Lagrange multipliers in the certificate
(``certificate.py``). The solvers keep their work arrays and caches themselves
(``admm.Workspace``); an :class:`Objective` is not modified after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.postprocess.operators import QuerySystem
from pipeline.postprocess.problem import ParentProblem
from pipeline.postprocess.projection import project_columns_sort


@dataclass
class L2Result:
    """Solution on the domain plus its certificate.

    ``Z`` (k, n_domain) is C1-feasible; ``f`` its objective value; ``gap`` bounds
    ``f(Z) - f*`` from above (persons^2 / variance units, same scale as ``f``); ``spread`` the
    KKT spread (0 at a KKT point); ``infeas`` is the largest violation of row totals / lower
    bounds (persons); ``certified`` says the stopping rule was met; ``method`` names the path.
    """

    Z: np.ndarray
    f: float
    gap: float
    spread: float
    infeas: float
    iterations: int
    certified: bool
    method: str


def zero_splits(prob: ParentProblem, totals: np.ndarray | None) -> bool:
    """Whether a parent's per-child zeros on the bound query go into the ``G X = W``
    splitting: with held child totals (the x-step then sees them; otherwise only the z-step
    does, and the held totals converge slowly)."""
    return (totals is not None and prob.zero_answers is not None
            and prob.allowed_mask is None and prob.zero_query == prob.bound_query
            and bool(np.any(prob.zero_answers)))


class Objective:
    """Objective data of one parent restricted to ``domain`` (sorted cell ids).

    ``queries``: the query names in this pass; ``totals``: float ``(k,)`` row constraints or
    None; ``lower``: float ``(k, n_answers(bound_query))`` or None. Attributes: ``w`` per-answer
    weights ``(n_local,)``, ``y`` targets ``(k, n_local)`` (0 where unmeasured), ``b = Q'Wy``
    ``(k, n)``, ``p`` parent on the domain ``(n,)``, ``allowed`` bool ``(k, n)``; with the
    ``G X = W`` splitting, ``lower`` / ``upper`` ``(k, n_local(bound_query))``.
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
        zero_split = zero_splits(prob, totals)
        split = lower is not None or zero_split
        names = self.queries + ((prob.bound_query,) if split else ())
        self.sys = QuerySystem(prob.spec, self.domain, tuple(dict.fromkeys(names)))
        self.allowed = prob.allowed(self.domain)
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

    def uniform_weights(self) -> dict[str, float] | None:
        """Per-query scalar weights if every answer carries its query's weight, else None."""
        out = {}
        for q in self.queries:
            wq = 1.0 / float(self.prob.variances[q])
            if not np.all(self.w[q] == wq):
                return None
            out[q] = wq
        return out

    def hess_apply(self, X: np.ndarray) -> np.ndarray:
        """``H X`` for X (k, n)."""
        out = np.zeros_like(X)
        for q in self.queries:
            out += self.sys.back(q, self.w[q][None, :] * self.sys.answer(q, X))
        return out

    def value_grad(self, X: np.ndarray) -> tuple[float, np.ndarray]:
        """``(f(X), grad f(X))`` for X (k, n), including the constant terms."""
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

    def project(self, V: np.ndarray) -> np.ndarray:
        """Euclidean projection of V (k, n) onto C1 (non-negativity, zeros, parent sums)."""
        if self.consistency:
            mask = None if self.allowed.all() else self.allowed
            return project_columns_sort(V, self.p, mask)[0]
        return np.where(self.allowed, np.maximum(V, 0.0), 0.0)

    def bound_answer(self, X: np.ndarray) -> np.ndarray:
        """``G X`` (k, n_local answers of the bound query)."""
        return self.sys.answer(self.prob.bound_query, X)

    def bound_back(self, A: np.ndarray) -> np.ndarray:
        """``G' A`` (k, n) for A (k, n_local answers of the bound query)."""
        return self.sys.back(self.prob.bound_query, A)
