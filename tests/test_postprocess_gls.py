"""Hierarchical GLS (pipeline/postprocess/gls.py) against a dense GLS solve with the explicit
query matrices, the tree sums and the structural zeros (unknowns = the leaves' free cells)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model.spec import load_spec
from pipeline.model.strategy import load_strategy
from pipeline.postprocess import gls
from pipeline.postprocess.problem import PostprocessError


def _query_variance(lf: gls.LevelFit, q: str) -> np.ndarray:
    """``(n_units, n_answers)`` variances of query ``q``'s answers through the fit's one
    covariance method (each answer a Kronecker product of per-attribute indicators; answers
    row-major over the query's ``by`` factors)."""
    spec = lf.model.spec
    maps = [spec.factor_map(f) for f in spec.query(q).by]
    pairs = []
    for combo in np.ndindex(*[len(labels) for _, _, labels in maps]):
        on = {name: (fm == j).astype(np.float64) for (name, fm, _), j in zip(maps, combo)}
        pairs.append([on.get(attr.name, np.ones(n)) for attr, n in zip(spec.attributes, lf.model.shape)])
    return lf.covariances_of(pairs, pairs)

def fit(spec, levels, means=True):
    """The exact hierarchical GLS of a whole tree in one up and one down pass (``levels[0]``: the
    root level; without ``means`` its covariances only): the reference every streamed or cut fit
    is compared with."""
    model = gls.GLSModel(spec, (q for lv in levels for q in lv.measured))
    return model.downward(model.upward(levels, means=means))


PL94 = load_spec("pl94")
UNITS = load_spec("units")
STRATEGY = load_strategy("census2020_pl94")

TINY_YAML = """
name: tiny
attributes:
  - {name: a, codes: [0, 1, 2], labels: [a0, a1, a2]}
  - {name: b, codes: [0, 1, 2, 3], labels: [b0, b1, b2, b3]}
  - {name: c, codes: [1, 2], labels: [c1, c2]}
recodes:
  bgrp: {attribute: b, groups: [[0, 1], [2, 3]], labels: [lo, hi]}
  agrp: {attribute: a, groups: [[0, 1], [2]], labels: [x, y]}
queries:
  total: {by: []}
  a: {by: [a]}
  bgrp: {by: [bgrp]}
  "a*c": {by: [a, c]}
  "agrp*bgrp": {by: [agrp, bgrp]}
  "b*c": {by: [b, c]}
  detailed: {by: [a, b, c]}
structural_zeros:
  - {name: z1, where: {a: [2], b: [0, 1]}}
  - {name: z2, where: {b: [3], c: [1]}}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    p.write_text(TINY_YAML)
    return load_spec(p)


# ------------------------------------------------------------------------------------------
# trees and measurements


def _ptrs(counts_per_level):
    """CSR child_ptr arrays from per-level child counts (level 0 = one root)."""
    return [None] + [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in counts_per_level]


def random_tree(rng, depth, max_children=3):
    """child counts per level below the root: uneven, at every level a parent of several
    children and (from the second level down) an only child."""
    n, out = 1, []
    for _ in range(depth - 1):
        c = rng.integers(1, max_children + 1, size=n)
        pick = rng.permutation(n)
        c[pick[0]] = rng.integers(2, max_children + 1)  # siblings at every level
        if n > 1:
            c[pick[1]] = 1  # and an only child
        out.append(c)
        n = int(c.sum())
    return _ptrs(out)


def measure(spec, ptrs, query_sets, rng, variances=None):
    """Random noisy measurements of random truths (the values need not be realistic)."""
    levels = []
    sizes = [1] + [int(p[-1]) for p in ptrs[1:]]
    for i, (ptr, qs) in enumerate(zip(ptrs, query_sets)):
        meas = {}
        for q in qs:
            var = variances[i][q] if variances else float(rng.uniform(0.5, 20.0))
            meas[q] = (rng.normal(5.0, 10.0, size=(sizes[i], spec.query(q).n_answers)), var)
        levels.append(gls.LevelMeasurements(ptr, meas, name=f"L{i}"))
    return levels


def strategy_levels(depth):
    # keep the nation (root, no `total`) at the top and the block level (detailed) at the bottom
    names = [STRATEGY.level_names[0]] + list(STRATEGY.level_names)[-(depth - 1):]
    qsets = [STRATEGY.queries(n) for n in names]
    var = [{q: float(STRATEGY.sigma2(n, q)) for q in STRATEGY.queries(n)} for n in names]
    return qsets, var


# ------------------------------------------------------------------------------------------
# the dense reference


class DenseGLS:
    """GLS with unknowns = the leaves' free cells, all measurements stacked explicitly."""

    def __init__(self, spec, levels):
        self.spec = spec
        free = np.flatnonzero(~spec.structural_zero_mask)
        self.free = free
        L = len(levels)
        # leaf-descendant membership per level
        n_leaf = int(levels[-1].child_ptr[-1]) if L > 1 else 1
        M = [None] * L
        M[L - 1] = sp.identity(n_leaf, format="csr")
        for i in range(L - 2, -1, -1):
            ptr = levels[i + 1].child_ptr
            parent = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
            S = sp.csr_matrix((np.ones(parent.size), (parent, np.arange(parent.size))),
                              shape=(ptr.size - 1, parent.size))
            M[i] = (S @ M[i + 1]).tocsr()
        self.M = M
        rows, ys, ws = [], [], []
        for i, lv in enumerate(levels):
            for q, (y, v) in lv.measured.items():
                Q = spec.query(q).matrix()[:, free]
                rows.append(sp.kron(M[i], Q, format="csr"))
                ys.append(np.asarray(y).ravel())
                ws.append(np.full(y.size, 1.0 / v))
        A = sp.vstack(rows).tocsr()
        W = np.concatenate(ws)
        N = (A.T @ sp.diags(W) @ A).toarray()
        rhs = A.T @ (W * np.concatenate(ys))
        self.cov = np.linalg.inv(N)
        self.beta = self.cov @ rhs
        self.n_leaf = n_leaf

    def _R(self, i, u, Lrows):
        """rows Lrows (k, d) applied to unit u of level i: (k, n_leaf * |free|)."""
        return sp.kron(self.M[i][u], sp.csr_matrix(Lrows[:, self.free])).toarray()

    def estimate(self, i):
        B = self.beta.reshape(self.n_leaf, -1)
        out = np.zeros((self.M[i].shape[0], self.spec.n_cells))
        out[:, self.free] = self.M[i] @ B
        return out

    def variances(self, i, Lrows):
        return self.covariances(i, Lrows, Lrows)

    def covariances(self, i, Lrows, Rrows):
        out = []
        for u in range(self.M[i].shape[0]):
            out.append(np.einsum("ij,ij->i", self._R(i, u, Lrows) @ self.cov, self._R(i, u, Rrows)))
        return np.array(out)


def _check_against_dense(spec, levels, queries, scale_tol=1e-9):
    res = fit(spec, levels)
    ref = DenseGLS(spec, levels)
    zero = spec.structural_zero_mask
    for i, lf in enumerate(res.levels):
        est = lf.estimate
        want = ref.estimate(i)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(est - want).max() <= scale_tol * scale, (i, np.abs(est - want).max())
        assert np.all(est[:, zero] == 0.0)  # exactly
        if i + 1 < len(res.levels):  # children sum to their parent
            ptr = levels[i + 1].child_ptr
            sums = np.add.reduceat(res.levels[i + 1].estimate, ptr[:-1], axis=0)
            assert np.abs(sums - est).max() <= 1e-9 * scale
        for q in queries:
            Q = spec.query(q).matrix().toarray()
            np.testing.assert_allclose(lf.query(q), want @ Q.T, atol=scale_tol * scale, rtol=0)
            vq = _query_variance(lf, q)
            vref = ref.variances(i, Q)
            assert vq.shape == vref.shape
            assert np.abs(vq - vref).max() <= scale_tol * max(1.0, float(vref.max())), q
    return res, ref


# ------------------------------------------------------------------------------------------
# agreement with the dense reference


@pytest.mark.parametrize("seed", range(4))
def test_tiny_spec_matches_dense_gls(tiny, seed):
    rng = np.random.default_rng(seed)
    depth = 2 + seed % 3
    ptrs = random_tree(rng, depth)
    allq = list(tiny.query_names)
    upper = [q for q in allq if q != "detailed"]
    qsets = [list(rng.choice(upper, size=rng.integers(0, len(upper) + 1), replace=False))
             for _ in range(depth - 1)]
    # the bottom: an identity-like set (detailed) plus random marginals
    qsets.append(["detailed"] + list(rng.choice(upper, size=2, replace=False)))
    levels = measure(tiny, ptrs, qsets, rng)
    res, ref = _check_against_dense(tiny, levels, allq)
    # the variance of a random Kronecker-product combination, at every level
    factors = [rng.normal(size=n) for n in tiny.shape]
    lvec = factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
    for i, lf in enumerate(res.levels):
        v = lf.covariances_of([factors], [factors])[:, 0]
        vref = ref.variances(i, lvec.reshape(1, -1))[:, 0]
        np.testing.assert_allclose(v, vref, rtol=1e-9, atol=1e-12)
    # covariances_of: several pairs of different Kronecker vectors at once (the margins' batch),
    # one pair a 0/1 line against the all-ones total
    def kron(fs):
        return (fs[0][:, None, None] * fs[1][None, :, None] * fs[2][None, None, :]).reshape(-1)
    lefts = [[rng.normal(size=n) for n in tiny.shape] for _ in range(3)]
    rights = [[rng.normal(size=n) for n in tiny.shape] for _ in range(3)]
    lefts.append([(rng.random(n) < 0.5).astype(float) for n in tiny.shape])
    rights.append([np.ones(n) for n in tiny.shape])
    for i, lf in enumerate(res.levels):  # a pair that is 0 everywhere: a column of zeros
        zero = lf.covariances_of([[np.zeros(n) for n in tiny.shape]], [[np.ones(n) for n in tiny.shape]])
        assert zero.shape == (lf.n_units, 1) and not zero.any()
    for i, lf in enumerate(res.levels):
        c = lf.covariances_of(lefts, rights)
        cref = ref.covariances(i, np.stack([kron(f) for f in lefts]), np.stack([kron(f) for f in rights]))
        assert c.shape == (lf.n_units, len(lefts))
        np.testing.assert_allclose(c, cref, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(cref).max())))


def _four_level_tree(tiny, spec_name, seed):
    """(spec, child pointers, measured levels) of a random 4-level tree: the tiny spec with mixed
    query sets, or PL94 with the 2020 strategy's queries and variances."""
    spec = tiny if spec_name == "tiny" else PL94
    rng = np.random.default_rng(seed)
    # PL94: two leaves under one parent, so the dense reference stays at 3,780 unknowns
    ptrs = random_tree(rng, 4, max_children=4) if spec_name == "tiny" else _ptrs([np.array([1])] * 2 + [np.array([2])])
    if spec_name == "tiny":
        qsets = [["total", "a"], ["bgrp", "a*c"], ["agrp*bgrp"], ["detailed", "b*c"]]
        variances = None
    else:
        qsets, variances = strategy_levels(4)
    return spec, ptrs, measure(spec, ptrs, qsets, rng, variances)


@pytest.mark.parametrize("spec_name", ["tiny", "pl94"])
def test_covariances_without_means_are_bitwise_those_with_means(tiny, spec_name):
    """A pass without means (the margins of error's) gives bitwise the covariances of a full
    pass on the same design, at every level and through a split (stacked messages); it carries
    no estimates."""
    spec, ptrs, levels = _four_level_tree(tiny, spec_name, 11)
    with_means = fit(spec, levels)
    without = fit(spec, levels, means=False)
    for a, b in zip(with_means.levels, without.levels):
        assert b.posterior.mean is None and b.n_units == a.n_units
        for ca, cb in zip(a.posterior.cov, b.posterior.cov):
            assert np.array_equal(ca, cb)
    with pytest.raises(PostprocessError, match="covariances only"):
        without.levels[-1].estimate
    # split below the root: the stacked messages carry no h, the covariances are the same
    model = gls.GLSModel(spec, [q for lv in levels for q in lv.measured])
    ups = [model.upward(_subtree(levels, 1, u), means=False) for u in range(int(ptrs[1][-1]))]
    top = model.upward(levels[:1], below=gls.stack_messages([u.message for u in ups]),
                       below_child_ptr=ptrs[1], means=False)
    assert top.message.h is None
    below = model.downward(top).below
    assert below is not None
    for u, up in enumerate(ups):
        fit_u = model.downward(up, below.select(u, u + 1))
        lo, hi = u, u + 1
        for i, lf in enumerate(fit_u.levels):
            if i:
                lo, hi = int(ptrs[i + 1][lo]), int(ptrs[i + 1][hi])
            for ca, cb in zip(with_means.levels[i + 1].posterior.cov, lf.posterior.cov):
                np.testing.assert_allclose(cb, ca[lo:hi], rtol=1e-10, atol=1e-12)


def test_up_pass_above_the_bottom_round_trips_through_arrays(tiny):
    """An up pass kept without its bottom boundary and restored from its arrays (the estimate
    stage's scratch file) gives bitwise the down pass of every level above the bottom."""
    rng = np.random.default_rng(5)
    ptrs = random_tree(rng, 4, max_children=4)
    levels = measure(tiny, ptrs, [["total", "a"], ["bgrp"], ["a*c"], ["detailed"]], rng)
    model = gls.GLSModel(tiny, [q for lv in levels for q in lv.measured])
    up = model.upward(levels)
    whole = model.downward(up)
    kept = gls.Upward.from_arrays(model, up.above_bottom().to_arrays())
    part = model.downward(kept)
    assert len(part.levels) == len(whole.levels) - 1
    for a, b in zip(whole.levels, part.levels):
        for x, y in zip(a.posterior.mean + a.posterior.cov, b.posterior.mean + b.posterior.cov):
            assert np.array_equal(x, y)
    for i in range(1, 3):
        assert np.array_equal(up.subtree(i).estimate, kept.subtree(i).estimate)
    with pytest.raises(PostprocessError, match="above_bottom"):
        kept.above_bottom().above_bottom().above_bottom()


@pytest.mark.parametrize("spec_name", ["tiny", "pl94"])
def test_up_pass_without_leaf_means_gives_the_same_fit_above_the_leaves(tiny, spec_name):
    """Without the leaves' own estimates (the estimate stage's up pass: its parents' sums are
    made from summed leaf measurements) every level above the leaves gets bitwise the
    estimates, subtree estimates and covariances of a pass with them, which match the dense
    GLS; the leaves get covariances and no mean."""
    spec, ptrs, levels = _four_level_tree(tiny, spec_name, 23)
    model = gls.GLSModel(spec, [q for lv in levels for q in lv.measured])
    up, lean = model.upward(levels), model.upward(levels, leaf_means=False)
    whole, part = model.downward(up), model.downward(lean)
    for a, b in zip(whole.levels[:-1], part.levels[:-1]):
        for x, y in zip(a.posterior.mean + a.posterior.cov, b.posterior.mean + b.posterior.cov):
            assert np.array_equal(x, y)
    for i in range(1, 3):
        assert np.array_equal(up.subtree(i).estimate, lean.subtree(i).estimate)
    assert part.levels[-1].posterior.mean is None
    for x, y in zip(whole.levels[-1].posterior.cov, part.levels[-1].posterior.cov):
        assert np.array_equal(x, y)
    ref = DenseGLS(spec, levels)
    for i in range(len(levels) - 1):
        want = ref.estimate(i)
        assert np.abs(part.levels[i].estimate - want).max() <= 1e-9 * max(1.0, float(np.abs(want).max()))
    # the leaves given as each parent's sums (what the estimate stage reads): the same pass, bitwise
    from dataclasses import replace

    from pipeline.model.geography import sum_children

    leaves = levels[-1]
    starts = np.asarray(leaves.child_ptr)[:-1]
    summed = replace(leaves, measured={q: (sum_children(v, starts), var) for q, (v, var) in leaves.measured.items()},
                     summed=True)
    given = model.upward([*levels[:-1], summed], leaf_means=False)
    assert np.array_equal(np.concatenate([h.ravel() for h in given.message.h]),
                          np.concatenate([h.ravel() for h in lean.message.h]))
    for a, b in zip(part.levels, model.downward(given).levels):
        for x, y in zip((a.posterior.mean or ()) + a.posterior.cov, (b.posterior.mean or ()) + b.posterior.cov):
            assert np.array_equal(x, y)
    with pytest.raises(PostprocessError, match="summed measurements"):
        model.upward([*levels[:-1], summed])  # the leaves' own means need every leaf's values


def test_leaves_share_their_parents_covariances(tiny):
    """The leaves' posterior covariances are stored once per parent as well (``shared``): they
    are exactly the per-leaf ones, and covariances of lines made from them equal those made
    from every leaf's own (and the dense GLS's)."""
    rng = np.random.default_rng(31)
    ptrs = random_tree(rng, 3, max_children=4)
    levels = measure(tiny, ptrs, [["total", "a"], ["bgrp", "a*c"], ["detailed"]], rng)
    leaf = fit(tiny, levels).levels[-1]
    assert leaf.posterior.shared is not None
    rows, covs = leaf.posterior.shared
    assert covs[0].shape[0] == ptrs[2].size - 1 and rows.shape == (leaf.n_units,)
    for full, distinct in zip(leaf.posterior.cov, covs):
        assert np.array_equal(full, distinct[rows])
    plain = gls.LevelFit(leaf.model, gls.Posterior(leaf.model, leaf.posterior.mean, leaf.posterior.cov))
    ones = [np.ones(n) for n in tiny.shape]
    lines = [[np.array([1.0, 0, 0]), np.ones(4), np.ones(2)], [np.ones(3), np.array([0, 0, 1.0, 1]), np.array([1.0, 0])]]
    got = leaf.covariances_of(lines, [ones, ones])
    np.testing.assert_allclose(got, plain.covariances_of(lines, [ones, ones]), rtol=1e-13, atol=1e-13)
    # made once per parent: one row per parent, the leaves' rows gathered from them
    values, at = leaf.distinct_covariances(leaf.model.pair_products(lines, [ones, ones]))
    assert at is rows and values.shape == (ptrs[2].size - 1, 2) and np.array_equal(values[at], got)
    assert plain.distinct_covariances(plain.model.pair_products(lines, [ones, ones]))[1] is None
    ref = DenseGLS(tiny, levels)
    L = np.stack([np.kron(np.kron(f[0], f[1]), f[2]) for f in lines])
    R = np.ones((2, tiny.n_cells))
    np.testing.assert_allclose(got, ref.covariances(2, L, R), rtol=1e-9, atol=1e-9)


def test_tiny_algebra_blocks(tiny):
    """The recode and the zeros split the axes as documented: `a` by agrp ({0,1},{2}); `b` by
    bgrp and the zero sets (0, 1 and 3 singletons, so 2 too); `c` by z2; kept axes add nothing."""
    m = gls.GLSModel(tiny, tiny.query_names)
    assert [ax.p for ax in m.axes] == [2, 4, 2]
    m2 = gls.GLSModel(tiny, ["total", "bgrp", "agrp*bgrp"])
    assert [ax.blocks for ax in m2.axes] == [((0, 1), (2,)), ((0,), (1,), (2,), (3,)), ((0,), (1,))]


def test_units_spec_matches_dense_gls():
    rng = np.random.default_rng(7)
    ptrs = random_tree(rng, 4, max_children=4)
    qsets = [["total"], ["total", "detailed"], [], ["detailed", "total"]]
    levels = measure(UNITS, ptrs, qsets, rng)
    _check_against_dense(UNITS, levels, ["total", "detailed"])


def test_pl94_strategy_matches_dense_gls():
    """The real spec with the 2020 strategy's query sets and variances (nation, block group,
    block; 2 leaves, so the dense reference stays at 3,780 unknowns)."""
    rng = np.random.default_rng(3)
    ptrs = _ptrs([np.array([2]), np.array([1, 1])])  # root -> 2 -> (1, 1)
    qsets, var = strategy_levels(3)
    levels = measure(PL94, ptrs, qsets, rng, var)
    res, ref = _check_against_dense(PL94, levels, ["total", "hhgq", "votingage*hispanic*cenrace"])
    # a table-line-like combination: adults (va=1) in group quarters, Hispanic, any race
    factors = [np.r_[0.0, np.ones(7)], np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.ones(63)]
    lvec = np.einsum("a,b,c,d->abcd", *factors).reshape(1, -1)
    for i, lf in enumerate(res.levels):
        np.testing.assert_allclose(lf.covariances_of([factors], [factors])[:, 0], ref.variances(i, lvec)[:, 0],
                                   rtol=1e-9)
    # `detailed` variances at the leaves (all 2016 answers, zeros have variance 0)
    vd = _query_variance(res.levels[-1], "detailed")
    np.testing.assert_allclose(vd, ref.variances(2, np.eye(PL94.n_cells)), rtol=1e-9, atol=1e-9)
    assert np.all(vd[:, PL94.structural_zero_mask] == 0.0)


# ------------------------------------------------------------------------------------------
# the streaming seam


def _subtree(levels, top_level, unit):
    """Levels top_level.. of the subtree under ``unit`` of ``top_level`` (child_ptr rebased)."""
    out, lo, hi, ptr = [], unit, unit + 1, None
    for i in range(top_level, len(levels)):
        meas = {q: (y[lo:hi], v) for q, (y, v) in levels[i].measured.items()}
        out.append(gls.LevelMeasurements(ptr, meas, levels[i].name))
        if i + 1 < len(levels):
            full = levels[i + 1].child_ptr
            ptr = full[lo:hi + 1] - full[lo]
            lo, hi = int(full[lo]), int(full[hi])
    return out


@pytest.mark.parametrize("spec_name", ["tiny", "pl94"])
def test_streaming_equals_whole_tree(tiny, spec_name):
    spec = tiny if spec_name == "tiny" else PL94
    rng = np.random.default_rng(11)
    ptrs = _ptrs([np.array([3]), np.array([2, 1, 3]), np.array([1, 2, 1, 1, 3, 2])])
    if spec_name == "tiny":
        qsets = [["total", "a"], ["bgrp", "a*c"], ["total"], ["detailed", "total"]]
    else:
        qsets = strategy_levels(4)[0]
    levels = measure(spec, ptrs, qsets, rng)
    whole = fit(spec, levels)
    model = gls.GLSModel(spec, {q for qs in qsets for q in qs})
    # per-state up passes; states are level 1 (3 of them)
    ups = [model.upward(_subtree(levels, 1, s)) for s in range(3)]
    top = model.upward(levels[:1], below=gls.stack_messages([u.message for u in ups]),
                       below_child_ptr=levels[1].child_ptr)
    top_fit = model.downward(top)
    assert top_fit.below is not None and top_fit.below.n_units == 3
    np.testing.assert_allclose(top_fit.levels[0].estimate, whole.levels[0].estimate,
                               rtol=0, atol=1e-10)
    parts = [model.downward(u, top_fit.below.select(s, s + 1)) for s, u in enumerate(ups)]
    for i in range(1, 4):
        est = np.concatenate([p.levels[i - 1].estimate for p in parts])
        np.testing.assert_allclose(est, whole.levels[i].estimate, rtol=0, atol=1e-10)
        var = np.concatenate([_query_variance(p.levels[i - 1], "total") for p in parts])
        np.testing.assert_allclose(var, _query_variance(whole.levels[i], "total"), rtol=1e-10)


def test_subtree_estimate_is_the_fit_of_the_subtree_alone(tiny):
    """``Upward.subtree(i)``: a unit's estimate from its own subtree's measurements only — the
    whole-tree GLS of that subtree with the unit as its root (estimate and covariance)."""
    rng = np.random.default_rng(5)
    ptrs = _ptrs([np.array([3]), np.array([2, 1, 3]), np.array([1, 2, 1, 1, 3, 2])])
    qsets = [["total", "a"], ["bgrp", "a*c"], ["total"], ["detailed", "total"]]
    levels = measure(tiny, ptrs, qsets, rng)
    model = gls.GLSModel(tiny, {q for qs in qsets for q in qs})
    up = model.upward(levels)
    for i in range(1, 4):
        sub = up.subtree(i)
        for u in range(sub.n_units):
            alone = fit(tiny, _subtree(levels, i, u)).levels[0]
            np.testing.assert_allclose(sub.estimate[u], alone.estimate[0], rtol=0, atol=1e-10)
            np.testing.assert_allclose(_query_variance(sub, "total")[u], _query_variance(alone, "total")[0], rtol=1e-10)
            np.testing.assert_allclose(_query_variance(sub, "a*c")[u], _query_variance(alone, "a*c")[0], rtol=1e-10)
    with pytest.raises(PostprocessError):
        up.subtree(0)


# ------------------------------------------------------------------------------------------
# errors


def test_bottom_level_must_identify_x(tiny):
    rng = np.random.default_rng(0)
    ptrs = _ptrs([np.array([2])])
    # every two-way marginal, but no three-way interaction: not identified
    levels = measure(tiny, ptrs, [["detailed"], ["a*c", "b*c", "agrp*bgrp"]], rng)
    with pytest.raises(PostprocessError, match="do not identify"):
        fit(tiny, levels)
    levels = measure(PL94, ptrs, [["total"], ["total", "hhgq"]], rng)
    with pytest.raises(PostprocessError, match="identity-like"):
        fit(PL94, levels)


def test_nan_is_refused_naming_level_and_query():
    rng = np.random.default_rng(0)
    ptrs = _ptrs([np.array([2])])
    levels = measure(UNITS, ptrs, [["total"], ["detailed"]], rng)
    y, v = levels[1].measured["detailed"]
    y = y.copy()
    y[1, 0] = np.nan
    levels[1] = gls.LevelMeasurements(levels[1].child_ptr, {"detailed": (y, v)}, name="block")
    with pytest.raises(PostprocessError, match=r"level 1 \(block\) query 'detailed'.*NaN"):
        fit(UNITS, levels)


def test_bad_tree_is_refused():
    rng = np.random.default_rng(0)
    levels = measure(UNITS, _ptrs([np.array([2])]), [["total"], ["detailed"]], rng)
    bad = gls.LevelMeasurements(np.array([0, 3]), levels[1].measured, name="block")
    with pytest.raises(PostprocessError, match="child_ptr"):
        fit(UNITS, [levels[0], bad])


def test_engine_weights_recover_raw_variances_and_fit_the_information():
    """For a leaf's own measurements the fitted per-query weights are exactly 1/v_q; for an
    internal unit's subtree estimate, the fitted sum is at least as close to J as 1/var(Q_q z)."""
    rng = np.random.default_rng(2)
    ptrs = _ptrs([np.array([2]), np.array([3, 2])])
    qsets, var = strategy_levels(3)
    levels = measure(PL94, ptrs, qsets, rng, var)
    model = gls.GLSModel(PL94, {q for qs in qsets for q in qs})
    up = model.upward(levels)
    leaf = up.subtree(2)
    w = leaf.engine_weights(qsets[2])
    for q in qsets[2]:
        assert w[q] * levels[2].measured[q][1] == pytest.approx(1.0, rel=1e-9)
    mid = up.subtree(1)
    fitted = mid.engine_weights(qsets[1])
    naive = {q: 1.0 / float(np.mean(_query_variance(mid, q))) for q in qsets[1]}

    def misfit(weights):
        err = 0.0
        for c, P in zip(model.components, mid.posterior.cov):
            if c.free.size == 0:
                continue
            J = np.linalg.inv(P).mean(axis=0)
            Li = np.linalg.inv(np.linalg.cholesky(J))
            H = sum(weights[q] * model.block(q, c) for q in weights)
            err += c.r * np.sum((Li @ (H - J) @ Li.T) ** 2)
        return err

    assert misfit(fitted) <= misfit(naive) + 1e-12
    assert all(v >= 0 for v in fitted.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300, allow_nan=False, width=64), min_size=1, max_size=40),
       st.integers(1, 4), st.integers(0, 40))
def test_exact_sum_is_the_sum_of_the_values_whatever_the_grouping(values, width, cut):
    """``exact_sum`` is the exact (rational) sum of every column, including subnormals, huge
    magnitudes and cancellation; the sums of two parts add up to the whole's, so a level's
    information summed over parts is the same for any cut (it was a float sum, whose last bits,
    and through the engine's weights a few published counts, depended on the parts)."""
    from fractions import Fraction

    x = np.resize(np.asarray(values, dtype=np.float64), (max(len(values) // width, 1), width))
    whole = gls.exact_sum(x)
    assert whole.shape == (width,)
    for j in range(width):
        assert whole[j] == sum((Fraction(v) for v in x[:, j].tolist()), Fraction(0))
    k = min(cut, x.shape[0])
    parts = gls.exact_sum(x[:k]) + gls.exact_sum(x[k:])
    assert all(a == b for a, b in zip(parts, whole))
    want = [float(sum((Fraction(v) for v in x[:, j].tolist()), Fraction(0))) for j in range(width)]
    assert gls.exact_float(whole).tolist() == want  # rounded once, correctly


def test_exact_sum_refuses_non_finite_values():
    with pytest.raises(PostprocessError, match="finite"):
        gls.exact_sum(np.array([[1.0], [np.inf]]))


def test_a_levels_information_sum_is_the_same_over_any_parts():
    """The estimate stage sums a level's information over its parts and fits the engine's
    weights to the total: whatever the cut, the parts' sums add up to exactly the level's (the
    float sum it replaces differed in its last bits between cuts, and so, through the weights,
    did a few published counts)."""
    rng = np.random.default_rng(7)
    ptrs = _ptrs([np.array([300]), rng.integers(1, 5, size=300)])
    qsets, var = strategy_levels(3)
    var = [{q: v * float(rng.uniform(0.5, 3.0)) for q, v in lv.items()} for lv in var]
    levels = measure(PL94, ptrs, qsets, rng, var)
    model = gls.GLSModel(PL94, {q for qs in qsets for q in qs})
    whole = model.downward(model.upward(levels)).levels[1]
    total = whole.information_sum()
    for cuts in ([0, 300], [0, 1, 300], [0, 97, 150, 151, 300], list(range(0, 301, 7)) + [300]):
        parts = [gls.LevelFit(model, whole.posterior.select(a, b)).information_sum() for a, b in zip(cuts, cuts[1:])]
        summed = [sum(p[c] for p in parts[1:]) + parts[0][c] for c in range(len(total))]
        for got, want in zip(summed, total):
            assert gls.exact_float(got).tobytes() == gls.exact_float(want).tobytes()
    assert whole.engine_weights(qsets[1]) == whole.engine_weights(qsets[1], total, 300)
