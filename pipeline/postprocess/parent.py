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
from pipeline.postprocess.objective import L2Result, Objective, zero_splits
from pipeline.postprocess.problem import ParentProblem, PostprocessError
from pipeline.postprocess.projection import project_capped_simplex
from pipeline.postprocess.rounding import controlled_round, largest_remainder
from pipeline.postprocess.solver import AdmmSolver, SolveOptions, Solver, objective, objectives

__all__ = ["Prepared", "SolveOptions", "finish_parent", "objective", "prepare_parent",
           "round_and_verify", "solve_least_squares", "solve_parent"]


@dataclasses.dataclass
class Prepared:
    """A parent ready for least squares: constraints made feasible, pass-1 totals fixed.

    ``prob`` may be a relaxed copy of the input; ``exact``: float ``(k,)`` exact child totals
    or None; ``totals``: the totals the least squares holds (exact, or pass-1 totals under
    multipass); ``queries``: the queries of the (last) pass; ``lower``: GQ lower bounds or None;
    ``shortcut``: int64 children when no least squares is needed (copy / empty / no children).
    """

    prob: ParentProblem
    st: ParentStats
    exact: np.ndarray | None = None
    totals: np.ndarray | None = None
    lower: np.ndarray | None = None
    queries: tuple[str, ...] = ()
    shortcut: np.ndarray | None = None


def prepare_parent(prob: ParentProblem, opts: SolveOptions) -> Prepared:
    """Shortcuts, the feasibility fallback and (multipass) the pass-1 child totals."""
    spec = prob.spec
    st = ParentStats()
    k = prob.k
    if k == 0:
        st.shortcut = "no-children"
        return Prepared(prob, st, shortcut=np.zeros((0, spec.n_cells), dtype=np.int64))
    if prob.has_parent and (k == 1 or not np.any(prob.parent)):
        N = np.zeros((k, spec.n_cells), dtype=np.int64)
        if k == 1:
            N[0] = np.asarray(prob.parent)
        st.shortcut = "copy" if k == 1 else "empty"
        verify_children(prob, N, prob.allowed(np.arange(spec.n_cells)), prob.lower_bounds())
        return Prepared(prob, st, shortcut=N)
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
    return Prepared(prob, st, exact, totals, lower, queries)


def _record(st: ParentStats, obj: Objective, res: L2Result) -> None:
    st.variables += int(obj.allowed.sum())
    st.iterations += res.iterations
    st.gap = max(st.gap, res.gap)
    st.rel_gap = max(st.rel_gap, res.gap / max(res.f, 1e-300))
    st.spread = max(st.spread, res.spread)
    st.infeas = max(st.infeas, res.infeas)
    st.method = res.method
    st.dropped_answers += obj.dropped
    if not res.certified:
        st.certified = False
        st.uncertified += 1


def _meets_lower(prob: ParentProblem, obj: Objective, Z: np.ndarray, lower: np.ndarray,
                 tol: float) -> bool:
    """Whether ``Z`` (k, n on ``obj``'s domain) meets the lower bounds ``lower`` (k, answers
    of the bound query) within ``tol``: ``G X`` on the answers the domain reaches (the same
    sums as on the full grid: the cells off the domain add exact zeros), 0 elsewhere."""
    t = obj.sys.terms.get(prob.bound_query)
    if t is None:  # the query is not among the objective's: answer it on the full grid
        G = prob.spec.query(prob.bound_query).answer(_full(prob, obj, Z))
        return bool((G >= lower - tol).all())
    reached = np.zeros(lower.shape[1], dtype=bool)
    reached[t.answers] = True
    return bool((obj.sys.answer(prob.bound_query, Z) >= lower[:, t.answers] - tol).all()
                and (lower[:, ~reached] <= tol).all())


def _full(prob: ParentProblem, obj: Objective, Z: np.ndarray) -> np.ndarray:
    X = np.zeros((prob.k, prob.spec.n_cells))
    X[:, obj.domain] = Z
    return X


def solve_least_squares(preps: list[Prepared], opts: SolveOptions, batched: bool = False,
                        solver: Solver | None = None) -> list[np.ndarray]:
    """Real children ``(k, n_cells)`` for every prepared parent (statistics go to ``prep.st``).

    Lower bounds are usually inactive at the optimum, so every parent is first solved without
    them (no splitting variable, far fewer iterations); if that optimum is certified and meets
    the bounds it is also the optimum with them, otherwise the parent is solved again with the
    bounds. ``batched``: the parents are one batch of ``solver.plan``, solved together;
    ``solver``: default :class:`solver.AdmmSolver`.
    """
    solver = solver or AdmmSolver()

    def run(objs: list[Objective]) -> list[L2Result]:
        return solver.solve(objs, opts, batched) if objs else []

    # a parent whose objective splits anyway (held totals with forced-zero answers) gains
    # nothing from a trial without its bounds: solve it with them at once
    wl = [p.lower is not None and zero_splits(p.prob, p.totals) for p in preps]
    objs = (objectives(preps, opts, wl) if batched
            else [objective(p, opts, with_lower=w) for p, w in zip(preps, wl)])
    X: list[np.ndarray | None] = [None] * len(preps)
    redo = []
    for i, (p, o, r) in enumerate(zip(preps, objs, run(objs))):
        Xi = _full(p.prob, o, r.Z)
        if p.lower is not None and o.lower is None:
            if not (r.certified and _meets_lower(p.prob, o, r.Z, p.lower, opts.feas_tol)):
                p.st.iterations += r.iterations  # the trial's work, then solve with bounds
                redo.append(i)
                continue
        _record(p.st, o, r)
        X[i] = Xi
    objs = (objectives([preps[i] for i in redo], opts, [True] * len(redo)) if batched
            else [objective(preps[i], opts, with_lower=True) for i in redo])
    for i, o, r in zip(redo, objs, run(objs)):
        _record(preps[i].st, o, r)
        X[i] = _full(preps[i].prob, o, r.Z)
    return X  # type: ignore[return-value]


def solve_parent(prob: ParentProblem, opts: SolveOptions | None = None,
                 solver: Solver | None = None) -> tuple[np.ndarray, ParentStats]:
    """Integer children ``(k, n_cells)`` int64 for one parent (alone, never batched), plus
    its statistics."""
    opts = opts or SolveOptions()
    prep = prepare_parent(prob, opts)
    if prep.shortcut is not None:
        return prep.shortcut, prep.st
    X = solve_least_squares([prep], opts, solver=solver)[0]
    return finish_parent(prep, X, opts), prep.st


def finish_parent(prep: Prepared, X: np.ndarray, opts: SolveOptions) -> np.ndarray:
    """Round and verify the real solution X of a prepared parent."""
    return round_and_verify(prep.prob, X, prep.exact, prep.lower, opts, prep.st)


def round_and_verify(prob: ParentProblem, X: np.ndarray, exact: np.ndarray | None,
                     lower: np.ndarray | None, opts: SolveOptions,
                     st: ParentStats) -> np.ndarray:
    """Round the real solution X (k, n_cells) and verify: the second half of a parent solve."""
    spec = prob.spec
    allowed = prob.allowed(np.arange(spec.n_cells))
    chain = tuple(opts.chain if opts.chain is not None else spec.rounder_chain)
    detailed_only = (exact is None and lower is None and prob.has_parent
                     and all(spec.query(q).n_answers == spec.n_cells for q in chain))
    if detailed_only:
        assert prob.parent is not None
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
