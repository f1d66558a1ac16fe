"""The ``Solver`` contract: production's ADMM (one parent with a dense or Kronecker x-step, or
batched) and a reference interior-point solver (Clarabel, ``postprocess_cases.ReferenceSolver``)
on the same small parents: exact totals, held (multipass) totals, GQ lower bounds, forced
zeros, the root.

Stated tolerances: objective values agree to ``REL_F = 1e-6`` relative; every result is
C1-feasible (x >= 0, zeros off ``allowed``, parent sums to 1e-8 persons) and meets held totals
and lower bounds to ``FEAS = 1e-6`` persons; KKT: ADMM's certified duality gap is at most
``tol * f`` and no solution beats its certified lower bound ``f - gap``; Clarabel's duality gap
is at most 1e-7 relative and its primal / dual KKT residuals at most 1e-7.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from postprocess_cases import PL94, ReferenceSolver, infeasibility, random_parent

from pipeline.postprocess import ParentProblem, solve_parent
from pipeline.postprocess.parent import objective, prepare_parent
from pipeline.postprocess.solver import AdmmSolver, SolveOptions, Thresholds, batchable

REL_F = 1e-6
FEAS = 1e-6
TOL = 1e-10


def _case(name: str) -> tuple[ParentProblem, bool]:
    """A small parent of the named shape and whether it is solved multipass."""
    if name == "plain":
        return random_parent(k=5, pop=40, seed=1)[0], False
    if name == "gq_bounds_and_zeros":
        return random_parent(k=6, pop=40, seed=2, gq=True)[0], False
    if name == "exact_totals":
        prob, truth = random_parent(k=5, pop=60, seed=3, gq=True)
        return dataclasses.replace(prob, totals=truth.sum(axis=1)), False
    if name == "multipass_held_totals":
        return random_parent(k=6, pop=50, seed=4, gq=True, alpha=0.2)[0], True
    if name == "active_bounds":
        prob, _ = random_parent(k=5, pop=30, seed=5, gq=True)
        low = np.asarray(prob.lower).copy()
        hh = PL94.query("hhgq").cell_to_answer
        low[0, 0] = int(prob.parent[hh == 0].sum() // 2)  # half the households in child 0
        return dataclasses.replace(prob, lower=low), False
    if name == "root":
        prob, truth = random_parent(k=1, pop=400, seed=6, gq=True)
        return ParentProblem(PL94, None, prob.targets, prob.variances,
                             totals=truth.sum(axis=1), lower=prob.lower,
                             zero_answers=prob.zero_answers), False
    raise KeyError(name)


CASES = ["plain", "gq_bounds_and_zeros", "exact_totals", "multipass_held_totals",
         "active_bounds", "root"]
# (implementation, batched, kron_min_cells): a parent is solved on the full grid with the
# Kronecker x-step from kron_min_cells free cells on (default 600): 1 sends these small
# parents there, 10**9 keeps every parent (also the root) on its free cells (dense x-step)
PATHS = {
    "admm-dense": (AdmmSolver(), False, 10**9),
    "admm-kron": (AdmmSolver(), False, 1),
    "admm-batched": (AdmmSolver(), True, 10**9),
}


def _feasible(obj, res) -> None:
    Z = res.Z
    assert Z.shape == (obj.k, obj.n)
    assert (Z >= 0).all() and (Z[~obj.allowed] == 0).all()
    if obj.consistency:
        np.testing.assert_allclose(Z.sum(axis=0), obj.p, atol=1e-8)
    assert infeasibility(obj, Z) <= FEAS and res.infeas <= FEAS


#: production has no such path: the batched ADMM takes parents only, and the root is always
#: solved on the full grid (Kronecker x-step)
NOT_A_PATH = {("root", "admm-batched"), ("root", "admm-dense")}


@pytest.mark.parametrize(("case", "path"), [(c, p) for c in CASES for p in PATHS if (c, p) not in NOT_A_PATH])
def test_admm_and_reference_solver_agree(case, path):
    solver, batched, kmc = PATHS[path]
    prob, multipass = _case(case)
    opts = SolveOptions(tol=TOL, feas_tol=FEAS, multipass=multipass,
                        paths=Thresholds(kron_min_cells=kmc))
    prep = prepare_parent(prob, opts)
    assert prep.shortcut is None
    assert not batched or batchable(prep, opts.paths)
    if multipass:
        assert prep.totals is not None and prep.exact is None  # pass-1 totals held
    obj = objective(prep, opts, with_lower=True)
    if path == "admm-kron":
        assert obj.n == PL94.n_cells  # the full grid
    ours = solver.solve([obj], opts, batched)[0]
    # the reference on the free cells (the same optimum: the full grid's other cells are 0
    # on C1; a QP on the full grid costs Clarabel seconds) unless that is the full grid
    ref_obj = obj
    if obj.n == PL94.n_cells and prob.has_parent:
        ref_obj = objective(prep, dataclasses.replace(opts, paths=Thresholds(kron_min_cells=10**9)),
                            with_lower=True)
    ref = ReferenceSolver().solve([ref_obj], opts, batched)[0]
    assert ours.method == {"admm-dense": "admm-eig", "admm-kron": "admm-kron",
                           "admm-batched": "admm-batch"}[path]
    # KKT: both solvers' own optimality measures
    assert ours.certified and ours.gap <= TOL * ours.f
    assert ref.certified and ref.gap <= 1e-7 * max(ref.f, 1.0) and ref.spread <= 1e-7
    # constraints
    _feasible(obj, ours)
    _feasible(ref_obj, ref)
    # objective values agree; neither beats the other's certified lower bound (up to the
    # FEAS slack: a point off the held totals by FEAS persons may sit slightly below f*)
    assert abs(ours.f - ref.f) <= REL_F * ref.f
    assert ref.f >= ours.f - ours.gap - REL_F * ref.f


@pytest.mark.parametrize("case", ["gq_bounds_and_zeros", "multipass_held_totals"])
def test_solve_parent_through_either_solver_meets_every_constraint(case):
    prob, multipass = _case(case)
    opts = SolveOptions(multipass=multipass)
    N_admm, st_admm = solve_parent(prob, opts)
    N_ref, st_ref = solve_parent(prob, opts, solver=ReferenceSolver())
    assert st_ref.method == "clarabel" and st_admm.method.startswith("admm")
    for N in (N_admm, N_ref):  # verify_children ran inside; the parent sums are exact
        np.testing.assert_array_equal(N.sum(axis=0), prob.parent)
    # equal real optima round to nearly equal integers (ties may break differently)
    assert np.abs(N_admm - N_ref).sum() <= 0.02 * prob.parent.sum()
