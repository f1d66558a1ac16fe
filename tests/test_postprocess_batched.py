"""Batched ADMM: the same optima, certificates and constraints as the one-parent ADMM."""

import numpy as np
import pytest
from postprocess_cases import PL94, hierarchy, infeasibility, random_parent, reference_qp, run_admm, run_levels

from pipeline.postprocess import LevelBatch
from pipeline.postprocess.admm import _Group, _inverse_sqrt_grouped, admm_batch, spd_inverse
from pipeline.postprocess.objective import Objective
from pipeline.postprocess.parent import prepare_parent, solve_least_squares, solve_parent
from pipeline.postprocess.solver import SolveOptions, Thresholds, _batches, batchable, plan
from pipeline.postprocess.topdown import solve_level


def _obj(prob, totals=None, lower=None):
    return Objective(prob, tuple(prob.targets), prob.free_cells(), totals, lower)


def _mixed_objectives():
    """Parents of different sizes (padding in k and n), with and without totals and bounds."""
    objs = []
    for s, (k, pop, gq, tot, low) in enumerate([
        (3, 20, False, False, False), (7, 15, True, False, True), (4, 80, False, True, False),
        (6, 30, True, True, True), (2, 200, True, False, True), (9, 8, False, False, False),
        (5, 40, True, True, False),
    ]):
        prob, truth = random_parent(k=k, pop=pop, seed=60 + s, gq=gq)
        totals = truth.sum(axis=1).astype(float) if tot else None
        objs.append(_obj(prob, totals, prob.lower_bounds() if low else None))
    return objs


def test_batch_matches_reference_qp_and_single_admm():
    objs = _mixed_objectives()
    results = admm_batch(objs, tol=1e-10)
    for o, r in zip(objs, results):
        assert r.certified and r.method == "admm-batch"
        assert r.Z.shape == (o.k, o.n)
        _, fref = reference_qp(o)
        assert abs(r.f - fref) <= 1e-6 * fref
        one = run_admm(o, "dense", tol=1e-10)
        assert abs(r.f - one.f) <= 1e-8 * one.f
        # the certificate is a true bound: f(Z) - f* <= gap
        assert r.f - fref <= r.gap + 1e-9 * fref
        assert r.gap <= 1e-10 * r.f
        # C1-feasible whatever the tolerance: x >= 0, zeros off allowed, parent sums
        assert (r.Z >= 0).all() and (r.Z[~o.allowed] == 0).all()
        np.testing.assert_allclose(r.Z.sum(axis=0), o.p, atol=1e-8)
        assert r.infeas <= 1e-7 and infeasibility(o, r.Z) <= 1e-7


def test_batch_result_does_not_depend_on_batch_company():
    objs = _mixed_objectives()
    together = admm_batch(objs, tol=1e-10)
    for o, r in zip(objs, together):
        alone = admm_batch([o], tol=1e-10)[0]
        assert abs(alone.f - r.f) <= 1e-8 * r.f


def test_held_totals_with_forced_zero_answers_use_the_splitting():
    # held totals + per-child zero answers: the bound query is split (box [0, 0]) even
    # without lower bounds, in the batch exactly as in the one-parent solver
    prob, truth = random_parent(k=6, pop=60, seed=71, gq=True)
    obj = _obj(prob, truth.sum(axis=1).astype(float))
    assert obj.upper is not None and obj.lower is not None
    r = admm_batch([obj], tol=1e-10)[0]
    _, fref = reference_qp(obj)
    assert r.certified and abs(r.f - fref) <= 1e-6 * fref
    zero = np.asarray(prob.zero_answers)[:, obj.sys.terms["hhgq"].answers]
    assert np.abs(obj.bound_answer(r.Z)[zero]).max(initial=0.0) <= 1e-9


def test_hitting_max_iter_is_reported_uncertified():
    objs = _mixed_objectives()[:3]
    res = admm_batch(objs, tol=1e-14, max_iter=3, check_every=1)
    assert all(not r.certified and r.iterations == 3 for r in res)
    for o, r in zip(objs, res):  # still C1-feasible
        assert (r.Z >= 0).all()
        np.testing.assert_allclose(r.Z.sum(axis=0), o.p, atol=1e-8)


def test_root_is_refused():
    prob, _ = random_parent(k=1, pop=20, seed=3)
    from pipeline.postprocess import ParentProblem

    root = ParentProblem(PL94, None, prob.targets, prob.variances)
    with pytest.raises(ValueError, match="root"):
        admm_batch([_obj(root)])


@pytest.mark.parametrize("multipass", [False, True])
def test_batched_least_squares_equals_one_by_one(multipass):
    probs = [random_parent(k=3 + s % 4, pop=50, seed=80 + s, gq=True)[0] for s in range(8)]
    opts = SolveOptions(tol=1e-10, multipass=multipass)
    one = [prepare_parent(p, opts) for p in probs]
    X1 = solve_least_squares(one, opts, batched=False)
    many = [prepare_parent(p, opts) for p in probs]
    X2 = solve_least_squares(many, opts, batched=True)
    for a, b, x1, x2 in zip(one, many, X1, X2):
        assert b.st.certified and b.st.method == "admm-batch"
        assert b.st.rel_gap <= 1e-10
        # same optimum (f within the certified gaps); solutions close in the strongly convex f
        assert np.abs(x1 - x2).max() <= 1e-3
        np.testing.assert_allclose(x2.sum(axis=0), b.prob.parent, atol=1e-8)
        if b.totals is not None:
            assert np.abs(x2.sum(axis=1) - b.totals).max() <= opts.feas_tol


def test_lower_bounds_violated_without_them_are_re_solved_with_them():
    prob, _ = random_parent(k=5, pop=10, seed=40, gq=True)
    low = np.zeros_like(prob.lower)
    low[0, 0] = prob.parent[PL94.query("hhgq").cell_to_answer == 0].sum()  # all households in child 0
    prob.lower = low
    opts = SolveOptions(tol=1e-10)
    prep = prepare_parent(prob, opts)
    X = solve_least_squares([prep], opts, batched=True)[0]
    G = PL94.query("hhgq").answer(X)
    assert (G >= low - opts.feas_tol).all()
    ref = solve_least_squares([prepare_parent(prob, opts)], opts)[0]
    assert np.abs(X - ref).max() <= 1e-3


def test_batches_group_by_size_under_the_caps():
    probs = [random_parent(k=3, pop=5 + 40 * (s % 3), seed=90 + s)[0] for s in range(10)]
    opts = SolveOptions(paths=Thresholds(batch_size=3, batch_max_bytes=10**9))
    preps = [prepare_parent(p, opts) for p in probs]
    groups = plan(preps, opts).batches
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(len(g) <= 3 for g in groups)
    sizes = [preps[i].prob.free_cells().size for g in groups for i in g]
    assert sizes == sorted(sizes)
    n_max = max(sizes)
    cap = 2 * n_max * n_max * 8
    tight = _batches(list(enumerate(preps)), Thresholds(batch_max_bytes=cap))
    assert sorted(i for g in tight for i in g) == list(range(10))
    for g in tight:  # P x n_max^2 float64 eigenvectors within the cap
        n = max(preps[i].prob.free_cells().size for i in g)
        assert len(g) * n * n * 8 <= cap
    assert any(len(g) == 2 for g in tight
               if max(preps[i].prob.free_cells().size for i in g) == n_max)


def test_level_batched_equals_unbatched_and_passes_checks():
    levels, _ = hierarchy(seed=4, fanout=(2, 2, 3, 3, 5))
    on, d_on = run_levels(PL94, levels, SolveOptions(tol=1e-10))
    off, _ = run_levels(PL94, levels, SolveOptions(tol=1e-10, paths=Thresholds(batched=False)))
    assert any(d.methods.get("admm-batch") for d in d_on)
    for name in on:
        # rounding of equal real solutions: identical up to near-ties. Both are certified to a
        # relative gap of 1e-10, which allows real solutions ~1e-3 apart along flat directions;
        # the accelerated paths (Anderson from the start alone, after 10 iterations in a batch)
        # end at different such points, so a near-tie may round differently: a child moves at
        # most two persons
        diff = np.abs(on[name] - off[name]).sum(axis=1)
        assert (diff <= 4).all(), name
        assert diff.sum() <= 2 * diff.size, name
    for name, nxt in zip(list(on)[:-1], list(on)[1:]):
        lev = next(lv for lv in levels if lv.name == nxt)
        assert (np.add.reduceat(on[nxt], lev.child_ptr[:-1], axis=0) == on[name]).all()
        assert (on[nxt] >= 0).all()


def test_solve_level_batched_matches_solve_parent():
    probs = [random_parent(k=4, pop=60, seed=100 + s, gq=True)[0] for s in range(6)]
    cat = lambda f: np.concatenate([f(p) for p in probs])  # noqa: E731
    batch = LevelBatch(PL94, np.stack([p.parent for p in probs]),
                       np.concatenate([[0], np.cumsum([p.k for p in probs])]),
                       {q: cat(lambda p: p.targets[q]) for q in probs[0].targets},
                       probs[0].variances, lower=cat(lambda p: p.lower),
                       zero_answers=cat(lambda p: p.zero_answers))
    opts = SolveOptions(tol=1e-10, multipass=True)
    N, diag = solve_level(batch, opts, level="bg")
    assert diag.methods.get("admm-batch", 0) == 6 and diag.uncertified == 0
    for i, p in enumerate(probs):
        Ni, _ = solve_parent(p, opts)
        got = N[batch.child_ptr[i]:batch.child_ptr[i + 1]]
        assert (got.sum(axis=0) == p.parent).all()
        assert np.abs(got - Ni).sum() <= 2


def test_parents_with_many_children_are_solved_alone():
    small, _ = random_parent(k=4, pop=30, seed=120)
    many, _ = random_parent(k=70, pop=3, seed=121)
    opts = SolveOptions()
    assert many.free_cells().size <= opts.paths.batch_max_cells
    assert batchable(prepare_parent(small, opts), opts.paths)
    assert not batchable(prepare_parent(many, opts), opts.paths)
    assert batchable(prepare_parent(many, opts), Thresholds(batch_max_children=70))
    assert not batchable(prepare_parent(small, opts), Thresholds(batched=False))


# -- the batch's arrays and kernels ----------------------------------------------------------
def test_batch_normal_matrices_are_each_parents_dense_one_bit_for_bit():
    """The code-and-table assembly of H adds the same weights in the same query order as
    ``dense_normal_matrix``; with a query whose weights differ between answers (a partly
    measured answer: weight 0) that query takes the masked add, and the sums still agree."""
    from pipeline.postprocess.operators import dense_normal_matrix

    objs = _mixed_objectives()
    G = _Group(objs)
    for i, o in enumerate(objs):
        assert np.array_equal(G.H[i, : o.n, : o.n], dense_normal_matrix(o.sys, o.w))
    # one child loses its cenrace answers: those answers are dropped (weight 0)
    prob, _ = random_parent(k=4, pop=60, seed=3)
    prob.targets["cenrace"][1, :12] = np.nan
    o = _obj(prob)
    assert o.dropped > 0 and len(set(o.w["cenrace"].tolist())) > 1
    objs2 = [o] + [_obj(random_parent(k=4, pop=60, seed=4 + s)[0]) for s in range(2)]
    G2 = _Group(objs2)
    for i, ob in enumerate(objs2):
        np.testing.assert_allclose(G2.H[i, : ob.n, : ob.n], dense_normal_matrix(ob.sys, ob.w),
                                   rtol=1e-15, atol=0)


def test_batch_value_and_gradient_equal_the_objectives():
    objs = _mixed_objectives()
    G = _Group(objs)
    rng = np.random.default_rng(5)
    X = np.zeros((len(objs), G.K, G.n))
    for i, o in enumerate(objs):
        X[i, : o.k, : o.n] = rng.gamma(1.0, 3.0, (o.k, o.n)) * o.allowed
    f, g = G.value_grad(X)
    for i, o in enumerate(objs):
        fo, go = o.value_grad(X[i, : o.k, : o.n])
        assert abs(f[i] - fo) <= 1e-12 * fo
        np.testing.assert_allclose(g[i, : o.k, : o.n], go, rtol=0, atol=1e-9 * np.abs(go).max())
        assert not g[i, o.k:].any() and not g[i, :, o.n:].any()  # padding stays inert


def test_batch_projection_warm_starts_and_stays_exact_after_parents_leave():
    from pipeline.postprocess.projection import project_columns_sort

    objs = _mixed_objectives()
    G = _Group(objs)
    rng = np.random.default_rng(6)
    V = rng.normal(0.0, 4.0, (len(objs), G.K, G.n))
    keep_all = np.ones(len(objs), dtype=bool)
    for step in range(4):
        if step == 2:  # two parents leave the batch: the kept thresholds follow
            keep = keep_all.copy()
            keep[[1, 4]] = False
            G.take(keep)
            V = V[keep]
            objs = [o for o, k in zip(objs, keep) if k]
        V = V + rng.normal(0.0, 0.3 if step else 4.0, V.shape)
        Z = G.project(V)
        assert G.taus["iterate"].shape == (len(objs), G.n)
        for i, o in enumerate(objs):
            ref, _ = project_columns_sort(V[i, : o.k, : o.n], o.p, o.allowed)
            np.testing.assert_allclose(Z[i, : o.k, : o.n], ref, rtol=0, atol=1e-10)
            assert not Z[i, o.k:].any() and not Z[i, :, o.n:].any()


def test_spd_inverse_by_cholesky_and_its_fallback():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(5, 30, 30))  # n >= 16: the Cholesky path
    M = A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(30)
    M[3] = np.diag(np.r_[-1.0, np.ones(29)])  # symmetric, not positive definite: LU fallback
    inv = spd_inverse(M)
    np.testing.assert_allclose(inv @ M, np.broadcast_to(np.eye(30), M.shape), atol=1e-8)
    assert np.array_equal(inv, np.swapaxes(inv, 1, 2))


def test_inverse_square_root_of_a_grouping_pencil():
    rng = np.random.default_rng(8)
    a = rng.integers(0, 4, (3, 12))
    real = rng.random((3, 12)) < 0.75  # padded cells belong to no group
    B = np.eye(12) + ((a[:, :, None] == a[:, None, :]) & real[:, :, None] & real[:, None, :])
    S = _inverse_sqrt_grouped(B)
    np.testing.assert_allclose(S @ B @ S, np.broadcast_to(np.eye(12), B.shape), atol=1e-14)
    assert np.array_equal(S, np.swapaxes(S, 1, 2))
