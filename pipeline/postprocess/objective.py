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

import math
from dataclasses import dataclass

import numpy as np

from pipeline.postprocess.operators import QuerySystem, QueryTerm
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
        self._finish(totals, lower, split, zero_split)

    def _finish(self, totals: np.ndarray | None, lower: np.ndarray | None, split: bool,
                zero_split: bool) -> None:
        """The parent on the domain, totals and the ``G X = W`` bounds (after ``sys``)."""
        prob = self.prob
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


def _sum_squares_measured(y: np.ndarray) -> float:
    """``sum y^2`` over the finite entries of ``y``, the same number as ``local_targets``'
    ``einsum`` over the zero-filled copy: without a copy when every entry is finite (then
    the values and their order are the same; einsum's sum depends only on them)."""
    flat = y.ravel()
    s = float(np.einsum("i,i->", flat, flat))
    if math.isfinite(s):
        return s
    ya = np.where(np.isfinite(y), y, 0.0).ravel()
    return float(np.einsum("i,i->", ya, ya))


def objectives(
    probs: list[ParentProblem],
    queries: tuple[str, ...],
    domains: list[np.ndarray],
    totals: list[np.ndarray | None],
    lowers: list[np.ndarray | None],
) -> list[Objective]:
    """``[Objective(p, queries, d, t, l) ...]`` for parents of one spec (one bound query),
    assembled together: the answer compression, measured / dead answers, weights, targets
    and ``b = Q'Wy`` of every query in a few passes over the padded ``(P, K, A)`` arrays of
    all parents instead of ~30 small numpy calls per parent and query.

    The same numbers as one :class:`Objective` per parent: gathers, comparisons and the
    element-wise products and sums (``b`` summed over the queries in the same order) do not
    depend on the layout, and the scalar reductions (the constant of answers off the
    domain) are the same calls on the same per-parent arrays.
    """
    P = len(probs)
    if P == 0:
        return []
    spec, bq = probs[0].spec, probs[0].bound_query
    if any(p.spec is not spec or p.bound_query != bq for p in probs):
        return [Objective(p, queries, d, t, lo)
                for p, d, t, lo in zip(probs, domains, totals, lowers)]
    queries = tuple(queries)
    doms = [np.asarray(d, dtype=np.int64) for d in domains]
    ks = np.array([p.k for p in probs], dtype=np.int64)
    ns = np.array([d.size for d in doms], dtype=np.int64)
    K, N = int(ks.max()), int(ns.sum())
    nmax = max(int(ns.max()), 1)
    zsplit = [zero_splits(p, t) for p, t in zip(probs, totals)]
    split = [lo is not None or z for lo, z in zip(lowers, zsplit)]
    objs = []
    for i, p in enumerate(probs):
        o = Objective.__new__(Objective)
        o.prob, o.k, o.domain, o.n, o.queries = p, p.k, doms[i], int(ns[i]), queries
        o.sys = QuerySystem.__new__(QuerySystem)
        o.sys.spec, o.sys.domain, o.sys.terms = spec, doms[i], {}
        o.allowed = p.allowed(doms[i])
        o.w, o.y, o.dropped = {}, {}, 0
        objs.append(o)
    # flat cells (parent, position) and padded children (parent, row)
    c0 = np.concatenate([[0], np.cumsum(ns)])
    seg = np.repeat(np.arange(P), ns)
    pos = np.arange(N) - np.repeat(c0[:-1], ns)
    dflat = np.concatenate(doms)
    rowm = np.arange(K)[None, :] < ks[:, None]  # (P, K) real children
    live = np.concatenate([o.allowed.any(axis=0) for o in objs]).astype(np.float64)
    bt = np.zeros((P, nmax, K))  # b transposed
    off_total = [0.0] * P
    names = queries + ((bq,) if any(split) else ())
    for q in dict.fromkeys(names):
        # answer compression per parent (QuerySystem): mark-and-count on each parent's row
        qq = spec.query(q)
        c2a = qq.cell_to_answer[dflat]
        mark = np.zeros((P, qq.n_answers), dtype=bool)
        mark[seg, c2a] = True
        lut = np.cumsum(mark, axis=1, dtype=np.int64) - 1
        ans = lut[seg, c2a]
        nl = mark.sum(axis=1)
        a0 = np.concatenate([[0], np.cumsum(nl)])
        _, acol = np.nonzero(mark)
        acol = acol.astype(np.int64)
        for i, o in enumerate(objs):
            if q in queries or split[i]:
                o.sys.terms[q] = QueryTerm(q, ans[c0[i]:c0[i + 1]], acol[a0[i]:a0[i + 1]])
        if q not in queries:
            continue
        A = max(int(nl.max()), 1)
        valid = np.arange(A)[None, :] < nl[:, None]
        yl = np.zeros((P, K, A))
        yy = [0.0] * P  # sum of squares of every measured answer, as local_targets
        for i, p in enumerate(probs):
            y = np.asarray(p.targets[q], dtype=np.float64)
            yl[i, : p.k, : nl[i]] = y[:, acol[a0[i]:a0[i + 1]]]
            yy[i] = _sum_squares_measured(y)
        m = np.isfinite(yl)
        yl = np.where(m, yl, 0.0)
        m_all = (m | ~rowm[:, :, None]).all(axis=1)
        m_any = (m & rowm[:, :, None]).any(axis=1)
        dead = np.bincount(seg * A + ans, weights=live, minlength=P * A).reshape(P, A) == 0
        full = m_all & ~dead
        dropped = ((m_any & ~m_all & ~dead) & valid).sum(axis=1)
        wq = 1.0 / float(probs[0].variances[q])
        W = wq * (full | dead)
        yq = np.where(full[:, None, :], yl, 0.0)
        ap = np.zeros((P, nmax), dtype=np.int64)
        ap[seg, pos] = ans
        # b += Q' (w y), b kept as (P, nmax, K): gather whole child columns of (P, A, K)
        wy = np.ascontiguousarray((W[:, None, :] * yq).transpose(0, 2, 1)).reshape(P * A, K)
        bt += wy[(np.arange(P)[:, None] * A + ap).ravel()].reshape(P, nmax, K)
        for i, o in enumerate(objs):
            k, n_l = o.k, int(nl[i])
            o.w[q] = W[i, :n_l]
            o.y[q] = yq[i, :k, :n_l]
            o.dropped += int(dropped[i])
            # the constant: as QuerySystem.local_targets and Objective, on the same arrays
            yli = yl[i, :k, :n_l]
            ylr = yli.ravel()
            off = max(yy[i] - float(np.einsum("i,i->", ylr, ylr)), 0.0)
            di = dead[i, :n_l]
            if di.any():  # else the sum is +0.0
                off += float(np.sum(np.where(di[None, :], yli, 0.0) ** 2))
            off_total[i] += wq * off
    for i, o in enumerate(objs):
        o.const_off = 0.5 * off_total[i]
        o.b = np.ascontiguousarray(bt[i, : o.n, : o.k].T)
        o._finish(totals[i], lowers[i], split[i], zsplit[i])
    return objs
