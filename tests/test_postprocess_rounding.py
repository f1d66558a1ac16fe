"""Controlled rounding: exact integer consistency, constraints, optimality vs a MILP, determinism."""

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from postprocess_cases import PL94, random_parent

from pipeline.postprocess.parent import SolveOptions, prepare_parent, solve_least_squares
from pipeline.postprocess.rounding import SNAP, controlled_round, largest_remainder


def _l2_solution(prob):
    opts = SolveOptions()
    return solve_least_squares([prepare_parent(prob, opts)], opts)[0]


def _chain_cost(spec, N, X, chain, totals=False):
    cost = 0.0
    for q in chain:
        a = spec.query(q).answer(X)
        cost += float(np.abs(spec.query(q).answer(N.astype(float)) - a).sum())
    return cost


def _milp_reference(spec, X, parent, allowed, chain, totals=None, lower=None):
    """min sum over chain answers |A n - a| with the same bounds, by HiGHS branch and bound."""
    k, n = X.shape
    live = allowed & (parent > 0)[None, :]
    idx = np.flatnonzero(live.ravel())
    cc, jj = np.unravel_index(idx, (k, n))
    nv = idx.size
    rows_A, lo_A, hi_A, avals = [], [], [], []
    for q in chain:
        c2a = spec.query(q).cell_to_answer
        na = spec.query(q).n_answers
        key = cc * na + c2a[jj]
        keys, inv = np.unique(key, return_inverse=True)
        A = sp.csr_matrix((np.ones(nv), (inv.ravel(), np.arange(nv))), shape=(keys.size, nv))
        a = np.bincount((np.arange(k)[:, None] * na + c2a[None, :]).ravel(), weights=X.ravel(),
                        minlength=k * na)[keys]
        r = np.rint(a)
        snapped = np.abs(a - r) <= SNAP
        lo = np.where(snapped, r, np.floor(a))
        hi = np.where(snapped, r, np.ceil(a))
        if q == "total" and totals is not None:
            lo = hi = totals[keys].astype(float)
        if q == "hhgq" and lower is not None:
            lo = np.maximum(lo, lower.ravel()[keys])
        rows_A.append(A)
        lo_A.append(lo)
        hi_A.append(hi)
        avals.append(a)
    A = sp.vstack(rows_A).tocsr()
    m = A.shape[0]
    a = np.concatenate(avals)
    # variables [n (nv), e (m)]: e >= A n - a, e >= a - A n
    I = sp.eye(m)
    cons = [
        scipy.optimize.LinearConstraint(sp.hstack([A, sp.csr_matrix((m, m))]), np.concatenate(lo_A), np.concatenate(hi_A)),
        scipy.optimize.LinearConstraint(sp.hstack([A, -I]), -np.inf, a),
        scipy.optimize.LinearConstraint(sp.hstack([-A, -I]), -np.inf, -a),
    ]
    C = sp.csr_matrix((np.ones(nv), (jj, np.arange(nv))), shape=(n, nv))
    cells = np.flatnonzero(parent > 0)
    cons.append(scipy.optimize.LinearConstraint(sp.hstack([C[cells], sp.csr_matrix((cells.size, m))]),
                                                parent[cells], parent[cells]))
    c = np.concatenate([np.zeros(nv), np.ones(m)])
    integrality = np.concatenate([np.ones(nv), np.zeros(m)])
    res = scipy.optimize.milp(c, constraints=cons, integrality=integrality,
                              bounds=scipy.optimize.Bounds(0, np.inf))
    assert res.status == 0, res.message
    return res.fun


@pytest.mark.parametrize("seed,gq,method", [(0, False, "flow"), (1, True, "flow"),
                                            (2, True, "lp"), (3, False, "lp"), (2, True, "flow")])
def test_flow_rounding_matches_milp(seed, gq, method):
    prob, truth = random_parent(k=6, pop=40, seed=seed, gq=gq)
    X = _l2_solution(prob)
    allowed = prob.allowed(np.arange(PL94.n_cells))
    chain = PL94.rounder_chain
    lower = prob.lower_bounds()
    N = controlled_round(PL94, X, prob.parent, allowed, chain, None, lower, method=method)
    assert N.dtype == np.int64 and (N >= 0).all()
    assert (N.sum(axis=0) == prob.parent).all()
    assert (N[~allowed] == 0).all()
    if lower is not None:
        assert (PL94.query("hhgq").answer(N) >= lower).all()
    for q in chain:  # every chain answer within floor/ceil of the real answer
        a = PL94.query(q).answer(X)
        na = PL94.query(q).answer(N)
        assert (na >= np.floor(a + SNAP) - 1e-9).all() and (na <= np.ceil(a - SNAP) + 1e-9).all()
    ours = _chain_cost(PL94, N, X, chain)
    ref = _milp_reference(PL94, X, prob.parent, allowed, chain, None, lower)
    assert abs(ours - ref) <= 1e-6 * max(ref, 1.0)


def test_exact_totals_are_met():
    prob, truth = random_parent(k=5, pop=30, seed=4)
    totals = truth.sum(axis=1)
    from postprocess_cases import run_admm

    from pipeline.postprocess.objective import Objective

    obj = Objective(prob, tuple(prob.targets), prob.free_cells(), totals.astype(float), None)
    res = run_admm(obj)
    X = np.zeros((5, PL94.n_cells))
    X[:, obj.domain] = res.Z
    allowed = prob.allowed(np.arange(PL94.n_cells))
    N = controlled_round(PL94, X, prob.parent, allowed, PL94.rounder_chain, totals)
    assert (N.sum(axis=1) == totals).all()
    assert (N.sum(axis=0) == prob.parent).all()
    ref = _milp_reference(PL94, X, prob.parent, allowed, PL94.rounder_chain, totals)
    assert abs(_chain_cost(PL94, N, X, PL94.rounder_chain) - ref) <= 1e-6 * max(ref, 1.0)


def test_largest_remainder_is_optimal_and_deterministic():
    rng = np.random.default_rng(5)
    k, n = 7, 60
    p = rng.integers(0, 15, n)
    X = np.stack([rng.dirichlet(np.ones(k)) * pj for pj in p], axis=1)
    X[:, 3] = p[3] / k  # exact ties
    N = largest_remainder(X, p)
    assert (N.sum(axis=0) == p).all() and (N >= 0).all()
    assert (np.abs(N - X) < 1).all()
    np.testing.assert_array_equal(N, largest_remainder(X.copy(), p))
    # ties go to the lowest child index
    r = p[3] - k * int(np.floor(p[3] / k))
    if r:
        assert (N[:r, 3] == np.ceil(p[3] / k)).all()
    # per-cell L1 optimum by brute force over the +1 assignments: LP on the interval matrix
    cost = 1 - 2 * (X - np.floor(X))
    for j in range(n):
        R = int(p[j] - np.floor(X[:, j]).sum())
        best = np.sort(cost[:, j])[:R].sum() if R else 0.0
        got = cost[:, j][N[:, j] - np.floor(X[:, j]) > 0].sum()
        assert abs(got - best) < 1e-9


def test_rounding_is_deterministic():
    prob, _ = random_parent(k=8, pop=30, seed=9, gq=True)
    X = _l2_solution(prob)
    allowed = prob.allowed(np.arange(PL94.n_cells))
    runs = [controlled_round(PL94, X, prob.parent, allowed, PL94.rounder_chain, None,
                             prob.lower_bounds()) for _ in range(3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def test_widened_rounding_recovers_from_inexact_totals():
    # an integral real solution whose child totals miss the exact totals by one person:
    # [floor, ceil] around the real answers cannot reach them, the widened LP can
    prob, truth = random_parent(k=4, pop=30, seed=10)
    X = truth.astype(float)
    totals = truth.sum(axis=1)
    totals[0] -= 1
    totals[1] += 1
    allowed = prob.allowed(np.arange(PL94.n_cells))
    with pytest.raises(Exception):
        controlled_round(PL94, X, prob.parent, allowed, PL94.rounder_chain, totals)
    N = controlled_round(PL94, X, prob.parent, allowed, PL94.rounder_chain, totals, widen=True)
    assert (N.sum(axis=1) == totals).all() and (N.sum(axis=0) == prob.parent).all()
