"""Solve one parent end to end: feasibility, least squares (one or two passes), rounding, checks.

Fallbacks (each counted in :class:`ParentStats`, never silent):
- ``relaxed_constraints``: the noisy parent makes the GQ lower bounds / per-child zeros
  infeasible; they are relaxed minimally (``feasibility.relax_constraints``).
- ``multipass_fallback``: pass-1 totals cannot be held together with the child constraints;
  the parent is solved in one pass with ``total`` as an ordinary query.
- ``uncertified``: the least-squares solve hit ``max_iter`` without its certificate; the last
  iterate (feasible for x >= 0 and the parent sums) is used and its bound is reported.
- ``rounding_widened``: the [floor, ceil] rounding LP was infeasible (held totals/bounds only met
  to a tolerance by the real solution); it is re-solved allowing one more unit either side.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.postprocess.checks import verify_children
from pipeline.postprocess.diagnostics import ParentStats
from pipeline.postprocess.feasibility import is_feasible, relax_constraints
from pipeline.postprocess.least_squares import admm, choose_inverse
from pipeline.postprocess.objective import L2Objective
from pipeline.postprocess.problem import ParentProblem, PostprocessError
from pipeline.postprocess.projection import project_capped_simplex
from pipeline.postprocess.rounding import controlled_round, largest_remainder


@dataclasses.dataclass
class SolveOptions:
    """Tolerances and choices for one level.

    ``tol``: relative suboptimality certificate (gap <= tol * f); ``feas_tol``: largest
    violation (persons) of held/exact child totals and lower bounds accepted in the real
    solution; the rounding then meets exact totals and bounds exactly (2020 held pass-1 totals
    within an optimised tolerance plus 0.1); ``multipass``: solve
    ``total`` alone first (2020 ordering for state, county, tract, block-group children);
    ``chain``: rounder chain (default ``spec.rounder_chain``); ``kron_min_cells``: free-set size
    from which the full-grid Kronecker x-step is used; ``batched``: solve eligible parents
    (no exact/held totals) together with batched FISTA, ``batch_size`` parents at a time.
    """

    tol: float = 1e-9
    feas_tol: float = 1e-3
    max_iter: int = 5000
    multipass: bool = False
    chain: tuple[str, ...] | None = None
    kron_min_cells: int = 600
    batched: bool = True
    batch_size: int = 64


def _l2(prob: ParentProblem, queries: tuple[str, ...], totals, lower, opts: SolveOptions, st: ParentStats):
    """One least-squares pass; returns X (k, n_cells).

    Lower bounds are usually inactive at the optimum, so the pass is first solved without them
    (no splitting variable, far fewer iterations); if that optimum meets the bounds it is also
    the optimum with them, otherwise the pass is re-solved with the bounds.
    """
    if lower is not None:
        trial = ParentStats()
        X = _l2_once(prob, queries, totals, None, opts, trial)
        G = prob.spec.query(prob.bound_query).answer(X)
        if trial.certified and (G >= lower - opts.feas_tol).all():
            st.iterations += trial.iterations
            for f in ("variables", "uncertified", "dropped_answers"):
                setattr(st, f, getattr(st, f) + getattr(trial, f))
            for f in ("gap", "rel_gap", "spread", "infeas"):
                setattr(st, f, max(getattr(st, f), getattr(trial, f)))
            st.method = trial.method
            return X
        st.iterations += trial.iterations
    return _l2_once(prob, queries, totals, lower, opts, st)


def _l2_once(prob, queries, totals, lower, opts: SolveOptions, st: ParentStats) -> np.ndarray:
    free = prob.free_cells()
    domain = free
    if free.size >= opts.kron_min_cells and free.size < prob.spec.n_cells:
        full = L2Objective(prob, queries, np.arange(prob.spec.n_cells), totals, lower)
        obj = full if full.uniform_weights() is not None else None
    else:
        obj = None
    if obj is None:
        obj = L2Objective(prob, queries, domain, totals, lower)
    inv, method = choose_inverse(obj, opts.kron_min_cells)
    res = admm(obj, inv, tol=opts.tol, feas_tol=opts.feas_tol, max_iter=opts.max_iter, method=method)
    st.variables += int(obj.allowed.sum())
    st.iterations += res.iterations
    st.gap = max(st.gap, res.gap)
    st.rel_gap = max(st.rel_gap, res.gap / max(res.f, 1e-300))
    st.spread = max(st.spread, res.spread)
    st.infeas = max(st.infeas, res.infeas)
    st.method = method
    st.dropped_answers += obj.dropped
    if not res.certified:
        st.certified = False
        st.uncertified += 1
    X = np.zeros((prob.k, prob.spec.n_cells))
    X[:, obj.domain] = res.Z
    return X


def solve_parent(prob: ParentProblem, opts: SolveOptions | None = None) -> tuple[np.ndarray, ParentStats]:
    """Integer children ``(k, n_cells)`` int64 for one parent, plus its statistics."""
    opts = opts or SolveOptions()
    spec = prob.spec
    st = ParentStats()
    k = prob.k
    N = np.zeros((k, spec.n_cells), dtype=np.int64)
    if k == 0:
        st.shortcut = "no-children"
        return N, st
    if prob.has_parent and k == 1:
        N[0] = prob.parent
        st.shortcut = "copy"
        verify_children(prob, N, prob.allowed(np.arange(spec.n_cells)), prob.lower_bounds())
        return N, st
    if prob.has_parent and not np.any(prob.parent):
        st.shortcut = "empty"
        verify_children(prob, N, prob.allowed(np.arange(spec.n_cells)), prob.lower_bounds())
        return N, st
    exact = None if prob.totals is None else np.asarray(prob.totals, dtype=np.float64)
    if not is_feasible(prob, exact):
        rel = relax_constraints(prob, exact)
        prob = dataclasses.replace(prob, allowed_mask=rel.allowed, lower=rel.lower)
        st.relaxed_constraints += max(rel.relaxed_bounds + rel.opened_cells, 1)
    lower = prob.lower_bounds()
    queries = tuple(prob.targets)
    totals = exact
    if (opts.multipass and prob.has_parent and exact is None and "total" in queries
            and len(queries) > 1 and np.isfinite(prob.targets["total"]).all()):
        allowed = prob.allowed(np.arange(spec.n_cells))
        pf = prob.parent_float()
        ub = (allowed * pf[None, :]).sum(axis=1)
        lb = np.zeros(k) if lower is None else lower.sum(axis=1)
        t1 = project_capped_simplex(prob.targets["total"][:, 0], float(pf.sum()), lb, ub)
        if is_feasible(prob, t1):
            totals = t1
            queries = tuple(q for q in queries if q != "total")
        else:
            st.multipass_fallback += 1
    X = _l2(prob, queries, totals, lower, opts, st)
    return round_and_verify(prob, X, exact, lower, opts, st), st


def batch_eligible(prob: ParentProblem, opts: SolveOptions) -> bool:
    """Whether a parent can go to the batched FISTA path (``batched.solve_batch``): it has a
    parent and >= 2 children, no exact or held child totals, and feasible constraints."""
    return (prob.has_parent and prob.k >= 2 and bool(np.any(prob.parent))
            and prob.totals is None and not (opts.multipass and "total" in prob.targets)
            and is_feasible(prob, None))


def round_and_verify(prob: ParentProblem, X: np.ndarray, exact, lower, opts: SolveOptions,
                st: ParentStats) -> np.ndarray:
    """Round the real solution X (k, n_cells) and verify: the second half of a parent solve."""
    spec = prob.spec
    allowed = prob.allowed(np.arange(spec.n_cells))
    chain = tuple(opts.chain if opts.chain is not None else spec.rounder_chain)
    detailed_only = (exact is None and lower is None and prob.has_parent
                     and all(spec.query(q).n_answers == spec.n_cells for q in chain))
    if detailed_only:
        N = largest_remainder(X, prob.parent)
    else:
        try:
            N = controlled_round(spec, X, prob.parent, allowed, chain, exact, lower,
                                 prob.bound_query)
        except PostprocessError:
            st.rounding_widened += 1
            N = controlled_round(spec, X, prob.parent, allowed, chain, exact, lower,
                                 prob.bound_query, widen=True)
    verify_children(prob, N, allowed, lower)
    return N
