"""Top-down entry points: end to end on a synthetic hierarchy, shortcuts, fallbacks, errors,
an injected process-pool mapper."""

import dataclasses

import numpy as np
import pytest
from postprocess_cases import PL94, hierarchy, random_parent, run_levels

from pipeline.model.spec import load_spec
from pipeline.postprocess import (
    LevelBatch,
    PostprocessError,
    SolveOptions,
    solve_level,
    solve_parent,
    solve_root,
)
from pipeline.postprocess.checks import verify_children
from pipeline.postprocess.feasibility import is_feasible, relax_constraints


def _check_level(levels, out):
    hh = PL94.query("hhgq")
    for i, lev in enumerate(levels):
        H = out[lev.name]
        assert H.dtype == np.int64 and (H >= 0).all()
        assert (H[:, PL94.structural_zero_mask] == 0).all()
        if lev.totals is not None:
            np.testing.assert_array_equal(H.sum(axis=1), lev.totals)
        G = hh.answer(H)
        assert (G[:, 1:] >= lev.lower[:, 1:]).all()  # persons in GQ type g >= facilities
        assert (G[lev.zero_answers] == 0).all()
        if i:
            parent = out[levels[i - 1].name]
            seg = np.repeat(np.arange(parent.shape[0]), np.diff(lev.child_ptr))
            sums = np.zeros_like(parent)
            np.add.at(sums, seg, H)
            np.testing.assert_array_equal(sums, parent)


def test_end_to_end_nation_to_block():
    levels, truth = hierarchy(seed=0)
    out, diags = run_levels(PL94, levels)
    _check_level(levels, out)
    assert [d.level for d in diags] == [lev.name for lev in levels]
    for d in diags:
        assert d.uncertified == 0
        assert d.max_rel_gap <= 1e-9
        assert d.seconds > 0
    # post-processing is far closer to the truth than the raw noisy detailed answers
    for name in ("county", "block"):
        err = np.abs(out[name] - truth[name]).sum()
        raw = np.abs(levels[[lev.name for lev in levels].index(name)].targets["detailed"]
                     - truth[name]).sum()
        assert err < 0.2 * raw


def test_deterministic_and_pool_equals_serial():
    levels, _ = hierarchy(seed=1, fanout=(2, 2, 1, 2, 3))
    a, _ = run_levels(PL94, levels)
    b, _ = run_levels(PL94, levels)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    lev = levels[-1]
    batch = LevelBatch(PL94, a["block_group"], lev.child_ptr, lev.targets, lev.variances,
                       lev.totals, lev.lower, lev.zero_answers)
    serial, _ = solve_level(batch)
    chunked, _ = solve_level(batch, chunks=3)
    # the caller's process pool as the mapper: work items and solve_range are picklable
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        pooled, d = solve_level(batch, mapper=lambda f, xs: list(pool.map(f, xs)), chunks=4)
    np.testing.assert_array_equal(serial, chunked)
    np.testing.assert_array_equal(serial, pooled)
    assert d.parents == batch.n_parents


def test_shortcuts_copy_and_empty():
    prob, _ = random_parent(k=1, pop=20, seed=3)
    N, st = solve_parent(prob)
    assert st.shortcut == "copy"
    np.testing.assert_array_equal(N[0], prob.parent)
    prob, _ = random_parent(k=3, pop=20, seed=3)
    prob = dataclasses.replace(prob, parent=np.zeros(PL94.n_cells, dtype=np.int64))
    N, st = solve_parent(prob)
    assert st.shortcut == "empty" and not N.any()


def test_infeasible_lower_bounds_are_relaxed_and_counted():
    prob, truth = random_parent(k=5, pop=20, seed=4, gq=True)
    lower = prob.lower.copy()
    c, g = np.argwhere(lower[:, 1:] > 0)[0]
    # the parent lost persons of that GQ type (noise): bounds can no longer all hold
    hh = PL94.query("hhgq").cell_to_answer
    parent = prob.parent.copy()
    parent[hh == g + 1] = 0
    parent[np.flatnonzero(hh == g + 1)[0]] = max(lower[:, g + 1].sum() - 1, 0)
    prob = dataclasses.replace(prob, parent=parent)
    assert not is_feasible(prob)
    rel = relax_constraints(prob)
    assert rel.relaxed_bounds >= 1
    assert rel.lower.sum() == prob.lower.sum() - 1  # minimal: exactly one person of slack
    N, st = solve_parent(prob)
    assert st.relaxed_constraints >= 1
    assert (N.sum(axis=0) == parent).all()
    assert (PL94.query("hhgq").answer(N) >= rel.lower).all()


def test_violation_names_the_parent():
    prob, truth = random_parent(k=3, pop=20, seed=5)
    bad = truth.copy()
    bad[0, np.flatnonzero(bad[0])[0]] += 1
    with pytest.raises(PostprocessError, match="synthetic-5"):
        verify_children(prob, bad, prob.allowed(np.arange(PL94.n_cells)), None)
    with pytest.raises(PostprocessError, match="synthetic-5"):
        verify_children(prob, truth - 2 * truth, prob.allowed(np.arange(PL94.n_cells)), None)


def test_uncertified_solve_is_counted():
    prob, _ = random_parent(k=6, pop=50, seed=6)
    N, st = solve_parent(prob, SolveOptions(max_iter=3, tol=1e-12))
    assert st.uncertified == 1 and not st.certified
    assert (N.sum(axis=0) == prob.parent).all()  # still exactly consistent


def test_units_spec_root_and_level():
    spec = load_spec("units")
    rng = np.random.default_rng(11)
    occ = rng.integers(0, 30, (9, 2))
    v = {"detailed": 3.0}
    root, d = solve_root(spec, {"detailed": occ.sum(axis=0)[None, :] + rng.normal(0, 1.7, (1, 2))},
                         v, total=int(occ.sum()))
    assert root.sum() == occ.sum()
    batch = LevelBatch(spec, root[None, :], np.array([0, 9]),
                       {"detailed": occ + rng.normal(0, 1.7, occ.shape)}, v,
                       totals=occ.sum(axis=1))
    kids, d = solve_level(batch)
    np.testing.assert_array_equal(kids.sum(axis=1), occ.sum(axis=1))
    np.testing.assert_array_equal(kids.sum(axis=0), root)


@pytest.mark.slow
def test_large_parent_3000_children():
    import time

    prob, truth = random_parent(k=3000, pop=40, seed=12, alpha=1.0)
    t0 = time.perf_counter()
    N, st = solve_parent(prob, SolveOptions(tol=1e-6, multipass=True))
    assert st.method == "admm-kron" and st.certified
    assert (N.sum(axis=0) == prob.parent).all() and (N >= 0).all()
    print(f"3000 x 2016: {time.perf_counter() - t0:.1f}s, {st}")


def test_level_accepts_sparse_parent_histogram():
    from pipeline.model.histogram import SparseHistogram

    levels, _ = hierarchy(seed=2, fanout=(2, 2, 1, 1, 3))
    out, _ = run_levels(PL94, levels)
    lev = levels[-1]
    dense = LevelBatch(PL94, out["block_group"], lev.child_ptr, lev.targets, lev.variances,
                       None, lev.lower, lev.zero_answers)
    sparse = LevelBatch(PL94, SparseHistogram.from_dense("block_group", out["block_group"]),
                        lev.child_ptr, lev.targets, lev.variances, None, lev.lower,
                        lev.zero_answers)
    np.testing.assert_array_equal(solve_level(dense)[0], solve_level(sparse)[0])


def test_root_bounds_above_total_are_lowered_minimally():
    rng = np.random.default_rng(13)
    v = {q: 2.0 for q in PL94.query_names}
    truth = np.zeros(PL94.n_cells, dtype=np.int64)
    truth[PL94.query("hhgq").cell_to_answer == 5] = 0
    truth[:40] = 3
    y = {q: PL94.query(q).answer(truth)[None, :] + rng.normal(0, 1.4, (1, PL94.query(q).n_answers))
         for q in PL94.query_names}
    lower = np.zeros((1, 8), dtype=np.int64)
    lower[0, 5] = truth.sum() + 7  # more facilities than the (exact) total allows
    root, d = solve_root(PL94, y, v, total=int(truth.sum()), lower=lower)
    assert root.sum() == truth.sum()
    assert d.relaxed_constraints >= 1 and d.fallbacks == 1
    assert PL94.query("hhgq").answer(root)[5] == truth.sum()  # bound lowered just to the total


def test_unrealisable_pass_one_totals_fall_back_to_one_pass():
    hh = PL94.query("hhgq").cell_to_answer
    rng = np.random.default_rng(14)
    truth = np.zeros((3, PL94.n_cells), dtype=np.int64)
    h_cells = np.flatnonzero((hh == 0) & ~PL94.structural_zero_mask)[:10]
    g_cells = np.flatnonzero((hh == 5) & ~PL94.structural_zero_mask)[:5]
    truth[0, g_cells] = 4          # child 0: a college dorm only
    truth[1, h_cells] = 3          # children 1, 2: households only
    truth[2, h_cells[:4]] = 5
    v = {q: 1.0 for q in PL94.query_names}
    y = {q: PL94.query(q).answer(truth) + rng.normal(0, 1, (3, PL94.query(q).n_answers))
         for q in PL94.query_names}
    y["total"][:, 0] = [5.0, 45.0, 20.0]  # noisy totals no arrangement of the parent can meet
    lower = np.zeros((3, 8), dtype=np.int64)
    lower[0, 5] = 1
    zero = np.zeros((3, 8), dtype=bool)
    zero[0, 0] = True
    zero[1:, 5] = True
    zero[:, [1, 2, 3, 4, 6, 7]] = True
    from pipeline.postprocess import ParentProblem

    prob = ParentProblem(PL94, truth.sum(axis=0), y, v, lower=lower, zero_answers=zero, label="mp")
    N, st = solve_parent(prob, SolveOptions(multipass=True))
    assert st.multipass_fallback == 1
    assert (N.sum(axis=0) == prob.parent).all()
    assert N[0, g_cells].sum() == 20 and N[1:, g_cells].sum() == 0  # zeros and bounds hold
