"""Feasibility of a parent's child constraints, and the minimal relaxation when it fails.

The truth satisfies every constraint, but the parent is a *noisy, rounded* histogram, so
after noise a child's GQ lower bounds (or its structural zeros, or held totals) may no longer
be compatible with the parent's cells. Whether ``{X >= 0 on allowed, sum_c x_c = p,
1'x_c = t_c, G x_c >= l_c}`` is non-empty only depends on aggregates: cells with the same
"allowed children" pattern and the same bound-query answer can be merged into one class, which
gives a small transportation LP (k x n_classes variables, HiGHS).

Fallback (documented, counted in diagnostics): minimise the total relaxation
``sum slack(l) + sum flow on disallowed (child, class) pairs`` and lower every violated bound
by its slack / open the disallowed pairs that carry flow. Exact totals are never relaxed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from pipeline.postprocess.problem import ParentProblem, PostprocessError

HALL_MAX_CHILDREN = 12  # up to here the 2^k subset check beats one HiGHS LP


@dataclass
class Relaxation:
    """Effective constraints after the fallback: ``allowed`` (k, n_cells) and ``lower``."""

    allowed: np.ndarray
    lower: np.ndarray | None
    relaxed_bounds: int
    opened_cells: int


def _classes(prob: ParentProblem, allowed: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, int]:
    """Merge cells by (allowed pattern, bound answer): returns class id per cell and count."""
    bq = prob.spec.query(prob.bound_query).cell_to_answer[cells]
    key = np.concatenate([allowed.T.astype(np.uint8), bq[:, None].astype(np.int64)], axis=1)
    _, cls = np.unique(key, axis=0, return_inverse=True)
    return cls.ravel(), int(cls.max()) + 1 if cls.size else 0


def _transport_lp(prob: ParentProblem, totals: np.ndarray | None,
                  relax: bool) -> tuple[Any, tuple[Any, ...]]:
    """Solve the aggregated transportation LP; returns (result, pieces) for the caller."""
    spec = prob.spec
    cells = np.nonzero(prob.parent_float() > 0)[0]
    allowed_full = prob.allowed(np.arange(spec.n_cells))
    allowed = allowed_full[:, cells]
    lower = prob.lower_bounds()
    k = prob.k
    cls, m = _classes(prob, allowed, cells)
    P = np.bincount(cls, weights=prob.parent_float()[cells], minlength=m)
    ok = np.zeros((k, m), dtype=bool)
    ok[:, cls] = allowed  # every cell of a class has the same pattern
    bq_of_cls = np.zeros(m, dtype=np.int64)
    bq_of_cls[cls] = spec.query(prob.bound_query).cell_to_answer[cells]
    pairs_c, pairs_k = np.nonzero(np.ones((k, m), dtype=bool) if relax else ok)
    nv = pairs_c.size
    cost = np.zeros(nv)
    if relax:
        cost[~ok[pairs_c, pairs_k]] = 1.0
    A_eq = [sp.csr_matrix((np.ones(nv), (pairs_k, np.arange(nv))), shape=(m, nv))]
    b_eq = [P]
    if totals is not None:
        A_eq.append(sp.csr_matrix((np.ones(nv), (pairs_c, np.arange(nv))), shape=(k, nv)))
        b_eq.append(np.asarray(totals, dtype=np.float64))
    A_eq = sp.vstack(A_eq).tocsr()
    A_ub, b_ub, n_slack = None, None, 0
    if lower is not None:
        ng = lower.shape[1]
        g_row = pairs_c * ng + bq_of_cls[pairs_k]
        A_ub = sp.csr_matrix((-np.ones(nv), (g_row, np.arange(nv))), shape=(k * ng, nv))
        b_ub = -lower.ravel()
        if relax:
            n_slack = k * ng
            A_ub = sp.hstack([A_ub, -sp.eye(n_slack)]).tocsr()
            A_eq = sp.hstack([A_eq, sp.csr_matrix((A_eq.shape[0], n_slack))]).tocsr()
            cost = np.concatenate([cost, np.ones(n_slack)])
    res = scipy.optimize.linprog(
        cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=np.concatenate(b_eq),
        bounds=(0, None), method="highs",
    )
    return res, (cells, cls, ok, pairs_c, pairs_k, nv, n_slack, allowed_full, lower)


def _trivially_feasible(prob: ParentProblem, totals: np.ndarray | None) -> bool:
    """No bounds and every child allowed on every parent cell: feasible iff totals add up."""
    if prob.lower_bounds() is not None:
        return False
    cells = np.nonzero(prob.parent_float() > 0)[0]
    if not prob.allowed(cells).all():
        return False
    if totals is None:
        return True
    return bool((totals >= -1e-9).all() and abs(totals.sum() - prob.parent_float().sum()) < 1e-6)


def _by_answer(prob: ParentProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parent's persons per bound-query answer ``(na,)``, forced zeros ``(k, na)`` bool and
    lower bounds ``(k, na)`` float (zeros when none)."""
    q = prob.spec.query(prob.bound_query)
    persons = np.bincount(q.cell_to_answer, weights=prob.parent_float(), minlength=q.n_answers)
    zero = (np.zeros((prob.k, q.n_answers), dtype=bool) if prob.zero_answers is None
            else np.asarray(prob.zero_answers, dtype=bool))
    low = prob.lower_bounds()
    return persons, zero, np.zeros((prob.k, q.n_answers)) if low is None else low


def _feasible_by_group(prob: ParentProblem) -> bool:
    """Exact check when zeros and bounds are both on one query's answers and no totals: the
    transportation problem splits by answer g, feasible iff each child with a bound on g is
    allowed on g, the bounds fit under the parent's persons in g, and a parent with persons
    in g has some child allowed on g."""
    P, zero, low = _by_answer(prob)
    if ((low > 0) & zero).any() or (low.sum(axis=0) > P + 1e-9).any():
        return False
    return not ((P > 0) & zero.all(axis=0)).any()


def _feasible_by_hall(prob: ParentProblem, totals: np.ndarray, tol: float = 1e-9) -> bool:
    """Exact check with child totals when zeros and bounds are on one query's answers.

    Shift the bounds out (child c takes ``l_cg`` of answer g first): the rest is a
    transportation problem with supplies ``P_g - sum_c l_cg``, demands ``t_c - sum_g l_cg`` and
    uncapped allowed pairs (c, g), so by Hall's theorem it is feasible iff supplies and demands
    are non-negative with equal sums and every set S of children demands no more than the
    supply of the answers some child of S may take. Enumerates the ``2^k`` sets (small k).
    """
    supply, zero, low = _by_answer(prob)
    supply = supply - low.sum(axis=0)
    demand = np.asarray(totals, dtype=np.float64) - low.sum(axis=1)
    if ((low > 0) & zero).any() or (supply < -tol).any() or (demand < -tol).any():
        return False
    if abs(supply.sum() - demand.sum()) > tol * max(1.0, supply.sum()):
        return False
    k = prob.k
    sets = (np.arange(1, 1 << k)[:, None] >> np.arange(k)[None, :]) & 1  # (2^k - 1, k)
    reach = (sets @ (~zero).astype(np.int64)) > 0  # answers some child of the set may take
    need = sets @ demand
    return bool((need <= reach @ np.maximum(supply, 0.0) + tol * max(1.0, supply.sum())).all())


def is_feasible(prob: ParentProblem, totals: np.ndarray | None = None) -> bool:
    """Whether the child constraints (and ``totals`` (k,) if given) admit a solution."""
    if not prob.has_parent:
        low = prob.lower_bounds()
        return totals is None or low is None or low.sum() <= float(totals[0]) + 1e-9
    if prob.k == 0 or _trivially_feasible(prob, totals):
        return True
    if prob.allowed_mask is None and prob.zero_query == prob.bound_query:
        if totals is None:
            return _feasible_by_group(prob)
        if prob.k <= HALL_MAX_CHILDREN:
            return _feasible_by_hall(prob, totals)
    res, _ = _transport_lp(prob, totals, relax=False)
    return res.status == 0


def relax_constraints(prob: ParentProblem, totals: np.ndarray | None = None) -> Relaxation:
    """Minimal relaxation of lower bounds and structural zeros (never of ``totals``)."""
    allowed_full = prob.allowed(np.arange(prob.spec.n_cells))
    lower = prob.lower_bounds()
    if not prob.has_parent:
        # root: lower the largest bounds until they fit under the total (the root is only
        # infeasible with bounds above its exact total)
        assert lower is not None and totals is not None
        flat = lower.ravel().copy()
        excess = flat.sum() - float(totals[0])
        for i in np.argsort(-flat, kind="stable"):
            d = min(flat[i], excess)
            flat[i] -= d
            excess -= d
            if excess <= 0:
                break
        return Relaxation(allowed_full, flat.reshape(lower.shape),
                          int((flat < lower.ravel()).sum()), 0)
    res, pieces = _transport_lp(prob, totals, relax=True)
    cells, cls, ok, pairs_c, pairs_k, nv, n_slack, allowed_full, lower = pieces
    if res.status != 0:
        raise PostprocessError(
            f"parent {prob.label}: child constraints infeasible even after relaxing bounds and "
            f"zeros (exact totals conflict with the parent): {res.message}"
        )
    flow = res.x[:nv]
    new_allowed = allowed_full.copy()
    opened = (flow > 1e-9) & ~ok[pairs_c, pairs_k]
    for c, kk in zip(pairs_c[opened], pairs_k[opened]):
        new_allowed[c, cells[cls == kk]] = True
    new_lower, nrel = lower, 0
    if n_slack:
        slack = np.ceil(res.x[nv:] - 1e-9).reshape(lower.shape)
        new_lower = np.maximum(lower - slack, 0.0)
        nrel = int((slack > 0).sum())
    return Relaxation(new_allowed, new_lower, nrel, int(opened.sum()))
