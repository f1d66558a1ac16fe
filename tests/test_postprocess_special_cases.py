"""Special case: a tree of nested marginals (or of totals) with inactive x >= 0 is a dense GLS.

When the measured queries of a parent are nested marginals (``total`` > ``hhgq`` >
``hhgq*hispanic`` > ... > ``detailed``) and the counts are large enough that non-negativity is
inactive at the optimum, the engine's problem is the equality-constrained generalised least
squares ``min (Ax - y)' S^-1 (Ax - y)`` s.t. ``sum_c x_c = p`` (and, optionally, exact child
totals ``1'x_c = t_c``), solved here by one dense KKT system with numpy, independently of the
engine's operators (notes section 7 item 7). The engine must reach that point on every path:
ADMM with the dense eigendecomposition on the free cells, ADMM with the Kronecker x-step on
the full grid, the driver's single and batched least squares, and the rounding on top keeps
every rounder-chain answer within floor/ceil of the GLS answer.

The pure tree of totals (only ``total`` measured, one shared variance) has the closed form
``t_c = y_c + (P - sum y)/k`` per parent (Hay et al. 2010), solved level by level top down.
"""

from __future__ import annotations

import numpy as np
import pytest
from postprocess_cases import PL94, certificate_gap, run_admm

from pipeline.model.spec import Attribute, HistogramSpec, Recode
from pipeline.postprocess import LevelBatch, ParentProblem, SolveOptions, solve_level, solve_parent
from pipeline.postprocess.admm import DenseInverse
from pipeline.postprocess.objective import Objective
from pipeline.postprocess.operators import dense_normal_matrix
from pipeline.postprocess.parent import prepare_parent, solve_least_squares

CHAIN = ("total", "hhgq", "hhgq*hispanic", "hhgq*hispanic*cenrace", "detailed")
assert CHAIN == tuple(PL94.rounder_chain)  # the nested chain of schemas/pl94.yaml
CHAIN_VAR = {"total": 4.0, "hhgq": 2.0, "hhgq*hispanic": 3.0, "hhgq*hispanic*cenrace": 1.5,
             "detailed": 1.0}

# 4 x 2 x 3 = 24 cells; axis a carries a recode, so its Kronecker factor is a dense 4 x 4 block
TOY = HistogramSpec(
    name="toy-tree",
    attributes=(Attribute("a", (0, 1, 2, 3), ("a0", "a1", "a2", "a3")),
                Attribute("b", (0, 1), ("b0", "b1")),
                Attribute("c", (0, 1, 2), ("c0", "c1", "c2"))),
    recodes={"agroup": Recode("agroup", "a", ((0, 1), (2, 3)), ("low", "high"))},
    query_defs={"total": (), "agroup": ("agroup",), "a": ("a",), "a*b": ("a", "b"),
                "detailed": ("a", "b", "c")},
    rounder_chain=("total", "agroup", "a", "a*b", "detailed"),
    structural_zero_defs=(),
)
TOY_VAR = {"total": 5.0, "agroup": 1.0, "a": 2.5, "a*b": 0.7, "detailed": 1.3}

X_RTOL = 1e-6  # max |x - x_gls| / max |x_gls|
F_RTOL = 1e-8  # |f - f_gls| / f_gls


# -- references (numpy only, no engine code) --------------------------------------------------
def dense_gls(spec: HistogramSpec, targets: dict[str, np.ndarray], variances: dict[str, float],
              parent: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
    """Equality-constrained GLS by one dense KKT solve; returns X (k, n_cells) float.

    Variables are the k x n entries on the cells with ``parent > 0`` (on the others
    ``sum_c x_c = 0`` with ``x >= 0`` forces 0). ``A = I_k (x) A1`` stacks every query's 0/1
    rows (answers with no such cell are constants and left out), ``S = diag(v_q)``.
    Constraints: ``(1_k' (x) I_n) x = p`` and, with ``totals`` (k,), ``(I_k (x) 1_n') x = t``
    minus its last row (implied by the others since sum t = sum p).
    """
    D = np.flatnonzero(parent > 0)
    k, n = next(iter(targets.values())).shape[0], D.size
    rows, w1, ys = [], [], []
    for q, y in targets.items():
        Q = spec.query(q).matrix().toarray()[:, D]
        keep = Q.any(axis=1)
        rows.append(Q[keep])
        w1.append(np.full(int(keep.sum()), 1.0 / variances[q]))
        ys.append(y[:, keep])
    A = np.kron(np.eye(k), np.vstack(rows))
    w = np.tile(np.concatenate(w1), k)
    y = np.concatenate(ys, axis=1).ravel()  # child-major, like x
    C = [np.kron(np.ones((1, k)), np.eye(n))]
    d = [parent[D].astype(np.float64)]
    if totals is not None:
        C.append(np.kron(np.eye(k), np.ones((1, n)))[:-1])
        d.append(np.asarray(totals, dtype=np.float64)[:-1])
    C = np.vstack(C)
    m = C.shape[0]
    K = np.block([[A.T @ (w[:, None] * A), C.T], [C, np.zeros((m, m))]])
    sol = np.linalg.solve(K, np.concatenate([A.T @ (w * y), np.concatenate(d)]))
    X = np.zeros((k, spec.n_cells))
    X[:, D] = sol[: k * n].reshape(k, n)
    return X


def gls_objective(spec: HistogramSpec, targets: dict[str, np.ndarray],
                  variances: dict[str, float], X: np.ndarray) -> float:
    """``1/2 sum_q sum_c |Q_q x_c - y_qc|^2 / v_q`` over every answer (the engine's f)."""
    return 0.5 * sum(float(np.sum((spec.query(q).answer(X) - y) ** 2)) / variances[q]
                     for q, y in targets.items())


def totals_gls(y: np.ndarray, v: float, P: float) -> np.ndarray:
    """Tree-of-totals step by a dense KKT solve: ``min |t - y|^2 / v`` s.t. ``1't = P``; (k,)."""
    k = y.size
    K = np.block([[np.eye(k) / v, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
    return np.linalg.solve(K, np.concatenate([y / v, [P]]))[:k]


# -- cases ------------------------------------------------------------------------------------
def nested_parent(spec: HistogramSpec, variances: dict[str, float], k: int, cells: np.ndarray,
                  pop: float, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Targets (true answers + Gaussian noise of the given variances) and truth (k, n_cells):
    every child has Poisson(pop) persons in each of ``cells`` and none elsewhere."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((k, spec.n_cells), dtype=np.int64)
    truth[:, cells] = rng.poisson(pop, (k, cells.size))
    targets = {}
    for q, v in variances.items():
        a = spec.query(q).answer(truth)
        targets[q] = a + rng.normal(0.0, np.sqrt(v), a.shape)
    return targets, truth


def pl94_case(seed: int = 3) -> tuple[dict[str, np.ndarray], np.ndarray]:
    cells = np.random.default_rng(seed).choice(np.flatnonzero(~PL94.structural_zero_mask), 120,
                                               replace=False)
    return nested_parent(PL94, CHAIN_VAR, k=5, cells=cells, pop=300, seed=seed)


def assert_matches(spec, targets, variances, X, ref, f=None):
    err = np.abs(X - ref).max() / np.abs(ref).max()
    assert err <= X_RTOL, f"max |x - x_gls| / max |x_gls| = {err:.3g}"
    fref = gls_objective(spec, targets, variances, ref)
    for val in (gls_objective(spec, targets, variances, X), f):
        if val is not None:
            assert abs(val - fref) <= F_RTOL * fref, (val, fref)


def within_floor_ceil(n: np.ndarray, a: np.ndarray, eps: float = 1e-6) -> bool:
    """``floor(a) <= n <= ceil(a)`` for every entry, up to the engine's error ``eps`` in a."""
    return bool(np.all((n >= np.floor(a - eps)) & (n <= np.ceil(a + eps))))


# -- 1. nested marginals ----------------------------------------------------------------------
@pytest.mark.parametrize("with_totals", [False, True])
def test_nested_chain_dense_path_equals_dense_gls(with_totals):
    targets, truth = pl94_case()
    p = truth.sum(axis=0)
    t = truth.sum(axis=1) if with_totals else None
    ref = dense_gls(PL94, targets, CHAIN_VAR, p, t)
    free = p > 0
    assert ref[:, free].min() > 100  # x >= 0 is inactive: the constrained optimum is the GLS
    np.testing.assert_allclose(ref.sum(axis=0), p, atol=1e-8)
    if with_totals:
        np.testing.assert_allclose(ref.sum(axis=1), t, atol=1e-8)

    prob = ParentProblem(PL94, p, targets, CHAIN_VAR, totals=t)
    obj = Objective(prob, CHAIN, prob.free_cells(), None if t is None else t.astype(float), None)
    res = run_admm(obj)
    assert res.method == "admm-eig"
    assert res.certified
    X = np.zeros_like(ref)
    X[:, obj.domain] = res.Z
    assert_matches(PL94, targets, CHAIN_VAR, X, ref, res.f)
    assert res.infeas <= 1e-7

    # the driver's least squares, one parent alone and through the batched ADMM
    opts = SolveOptions()
    for batched in (False, True):
        prep = prepare_parent(prob, opts)
        X = solve_least_squares([prep], opts, batched=batched)[0]
        assert prep.st.certified
        assert_matches(PL94, targets, CHAIN_VAR, X, ref)


@pytest.mark.parametrize("with_totals", [False, True])
@pytest.mark.parametrize("zero_cell", [False, True])
def test_nested_chain_kron_path_equals_dense_gls(zero_cell, with_totals):
    # free set = full grid (zero_cell False) or the full grid with a parent zero held at 0
    # by the projection (True): the Kronecker x-step; the dense path on the free cells agrees
    cells = np.delete(np.arange(TOY.n_cells), 5) if zero_cell else np.arange(TOY.n_cells)
    targets, truth = nested_parent(TOY, TOY_VAR, k=6, cells=cells, pop=200, seed=11)
    p = truth.sum(axis=0)
    assert (p == 0).sum() == int(zero_cell)
    t = truth.sum(axis=1) if with_totals else None
    tf = None if t is None else t.astype(float)
    ref = dense_gls(TOY, targets, TOY_VAR, p, t)
    assert ref[:, p > 0].min() > 100
    prob = ParentProblem(TOY, p, targets, TOY_VAR, totals=t)

    full = Objective(prob, tuple(TOY_VAR), np.arange(TOY.n_cells), tf, None)
    res = run_admm(full, kron_min_cells=TOY.n_cells, tol=1e-10)
    assert res.method == "admm-kron"
    assert res.certified and res.infeas <= 1e-7
    assert_matches(TOY, targets, TOY_VAR, res.Z, ref, res.f)
    assert np.all(res.Z[:, p == 0] == 0.0)

    obj = Objective(prob, tuple(TOY_VAR), prob.free_cells(), tf, None)
    res = run_admm(obj, "dense")
    assert res.certified
    X = np.zeros_like(ref)
    X[:, obj.domain] = res.Z
    assert_matches(TOY, targets, TOY_VAR, X, ref, res.f)


def test_dense_inverse_modulus_is_smallest_eigenvalue():
    targets, truth = nested_parent(TOY, TOY_VAR, k=3, cells=np.arange(TOY.n_cells), pop=200,
                                   seed=12)
    prob = ParentProblem(TOY, truth.sum(axis=0), targets, TOY_VAR)
    obj = Objective(prob, tuple(TOY_VAR), prob.free_cells(), None, None)
    lam_min = np.linalg.eigvalsh(dense_normal_matrix(obj.sys, obj.w)).min()
    assert lam_min >= 1.0 / TOY_VAR["detailed"] - 1e-9  # detailed measured: H >= w_detailed I
    assert DenseInverse(obj).mu == pytest.approx(lam_min, rel=1e-9)


# -- 2. tree of totals ------------------------------------------------------------------------
def totals_parent(seed: int, k: int, v: float) -> tuple[ParentProblem, np.ndarray]:
    """A PL94 parent (sparse Dirichlet cell mix, ~400 persons per child) with only ``total``
    measured for its children; returns it and the closed-form GLS child totals."""
    rng = np.random.default_rng(seed)
    base = rng.dirichlet(np.full(PL94.n_cells, 0.1))
    base[PL94.structural_zero_mask] = 0.0
    truth = np.stack([rng.multinomial(int(rng.poisson(400)), base / base.sum()) for _ in range(k)])
    y = truth.sum(axis=1, keepdims=True) + rng.normal(0.0, np.sqrt(v), (k, 1))
    p = truth.sum(axis=0)
    return ParentProblem(PL94, p, {"total": y}, {"total": v}), y[:, 0] + (p.sum() - y.sum()) / k


def test_tree_of_totals_is_closed_form():
    k, v = 5, 2.0
    prob, closed = totals_parent(seed=4, k=k, v=v)
    y, P = prob.targets["total"][:, 0], float(prob.parent.sum())
    assert closed.min() > 0  # x >= 0 is inactive for the totals (a non-negative split exists)
    np.testing.assert_allclose(totals_gls(y, v, P), closed, rtol=1e-12)
    fstar = (P - y.sum()) ** 2 / (2 * k * v)
    # the cell split is not unique (H = w 11' is singular): compare totals and objective. The
    # certificate cannot be met here (see the xfail below), so cap the iterations (the full
    # grid, zeros held by the projection, converges more slowly: 7e-8 persons after 200)
    full = np.arange(PL94.n_cells)
    for domain, kmc, expect, iters in ((prob.free_cells(), 600, "admm-eig", 100),
                                       (full, 100, "admm-kron", 300)):
        obj = Objective(prob, ("total",), domain, None, None)
        res = run_admm(obj, kron_min_cells=kmc, max_iter=iters)
        assert res.method == expect
        assert (res.Z >= 0).all()
        np.testing.assert_allclose(res.Z.sum(axis=0), obj.p, atol=1e-9)
        np.testing.assert_allclose(res.Z.sum(axis=1), closed, rtol=1e-9)
        assert abs(res.f - fstar) <= 1e-6 * fstar


@pytest.mark.xfail(strict=True, reason=(
    "engine limitation: with only `total` measured (mu = 0, tiny f* = (P - sum y)^2 / (2kv)) "
    "the Frank-Wolfe certificate has a rounding floor of ~1e-7 * f even at the exact optimum, "
    "so admm runs to max_iter (here 5000 iterations, 2-12 s for this 426-cell parent on the "
    "dense or Kronecker path) and reports uncertified although its totals are exact to 1e-10"))
def test_tree_of_totals_certificate_at_exact_optimum():
    prob, closed = totals_parent(seed=4, k=5, v=2.0)
    obj = Objective(prob, ("total",), prob.free_cells(), None, None)
    Z = closed[:, None] * obj.p[None, :] / obj.p.sum()  # an optimal split: rows = closed form
    f, gap = certificate_gap(obj, Z)
    assert gap <= 1e-9 * f


def test_two_level_tree_of_totals_equals_sequential_gls():
    # root fixed -> 3 children -> 2, 3 and 4 grandchildren, only `total` measured per level
    rng = np.random.default_rng(21)
    ptr1, ptr2 = np.array([0, 3]), np.array([0, 2, 5, 9])
    base = rng.dirichlet(np.full(PL94.n_cells, 0.1))
    base[PL94.structural_zero_mask] = 0.0
    blocks = np.stack([rng.multinomial(int(rng.poisson(300)), base / base.sum()) for _ in range(9)])
    root = blocks.sum(axis=0)
    v1, v2 = 3.0, 1.5
    t1 = np.add.reduceat(blocks.sum(axis=1), ptr2[:-1])  # true level-1 totals
    y1 = t1[:, None] + rng.normal(0, np.sqrt(v1), (3, 1))
    y2 = blocks.sum(axis=1, keepdims=True) + rng.normal(0, np.sqrt(v2), (9, 1))
    opts = SolveOptions(max_iter=300)  # totals-only parents stop on max_iter (xfail above)
    parents = root[None, :]
    for ptr, y, v in ((ptr1, y1, v1), (ptr2, y2, v2)):
        batch = LevelBatch(PL94, parents, ptr, {"total": y}, {"total": v})
        out, diag = solve_level(batch, opts)
        assert diag.rounding_widened == 0
        for i in range(batch.n_parents):
            a, b = ptr[i], ptr[i + 1]
            # sequential GLS: this parent's published (integer) total is fixed
            P = float(parents[i].sum())
            ref = totals_gls(y[a:b, 0], v, P)
            np.testing.assert_allclose(ref, y[a:b, 0] + (P - y[a:b, 0].sum()) / (b - a))
            assert ref.min() > 0
            prob = batch.problem(i)
            obj = Objective(prob, ("total",), prob.free_cells(), None, None)
            res = run_admm(obj, "dense", max_iter=100)
            np.testing.assert_allclose(res.Z.sum(axis=1), ref, rtol=1e-9)
            # 3. rounding keeps every child total within floor/ceil of the GLS total
            assert within_floor_ceil(out[a:b].sum(axis=1), ref), (out[a:b].sum(axis=1), ref)
            np.testing.assert_array_equal(out[a:b].sum(axis=0), parents[i])
        parents = out


# -- 3. rounding on top of the GLS answer -----------------------------------------------------
@pytest.mark.parametrize("with_totals", [False, True])
def test_rounding_keeps_chain_within_floor_ceil_of_gls(with_totals):
    targets, truth = pl94_case(seed=9)
    p = truth.sum(axis=0)
    t = truth.sum(axis=1) if with_totals else None
    ref = dense_gls(PL94, targets, CHAIN_VAR, p, t)
    assert ref[:, p > 0].min() > 100
    N, st = solve_parent(ParentProblem(PL94, p, targets, CHAIN_VAR, totals=t))
    assert st.certified and st.rounding_widened == 0
    np.testing.assert_array_equal(N.sum(axis=0), p)
    if with_totals:
        np.testing.assert_array_equal(N.sum(axis=1), t)
    for q in CHAIN:  # the chain is nested, so the controlled rounding keeps all of it
        Q = PL94.query(q)
        assert within_floor_ceil(Q.answer(N), Q.answer(ref)), q
