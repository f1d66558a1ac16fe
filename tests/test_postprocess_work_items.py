"""Work items of a level: longest processing time first, the level's own batches (the same for
any number of items), children back in parent order and identical to one item's."""

import numpy as np
from postprocess_cases import PL94, random_parent

from pipeline.postprocess import LevelBatch, SolveOptions, solve_level
from pipeline.postprocess.problem import LevelBatch as _LB
from pipeline.postprocess.solver import Thresholds
from pipeline.postprocess.topdown import work_items


def _level(probs) -> LevelBatch:
    def cat(f):
        parts = [f(p) for p in probs]
        return None if parts[0] is None else np.concatenate(parts)

    return LevelBatch(PL94, np.stack([p.parent for p in probs]),
                      np.concatenate([[0], np.cumsum([p.k for p in probs])]),
                      {q: cat(lambda p, q=q: p.targets[q]) for q in probs[0].targets},
                      probs[0].variances, lower=cat(lambda p: p.lower),
                      zero_answers=cat(lambda p: p.zero_answers),
                      labels=np.array([f"p{i}" for i in range(len(probs))]))


def _probs():
    small = [random_parent(k=3, pop=40, seed=300 + s, alpha=0.05, gq=True)[0] for s in range(14)]
    large = random_parent(k=12, pop=400, seed=7, alpha=1.0, gq=True)[0]  # one parent alone
    one = random_parent(k=1, pop=30, seed=8, gq=True)[0]  # a copy shortcut
    return small[:5] + [large] + small[5:9] + [one] + small[9:]


def test_items_cover_every_parent_once_largest_first():
    probs = _probs()
    batch = _level(probs)
    opts = SolveOptions(paths=Thresholds(batch_size=3))
    items = work_items(batch, opts, 4)
    assert 1 < len(items) <= 4
    seen = sorted(i for it in items for i in it.parents)
    assert seen == list(range(batch.n_parents))
    costs = [it.cost for it in items]
    assert costs == sorted(costs, reverse=True)
    assert 5 in items[0].parents  # the large parent (not batchable) leads the first item
    # the batches are the level's, whatever the number of items (they decide the floats)
    one = {tuple(g) for it in work_items(batch, opts, 1) for g in it.groups}
    for n in (2, 4, 7):
        assert {tuple(g) for it in work_items(batch, opts, n) for g in it.groups} == one
    for it in items:
        for g in it.groups:
            assert set(g) <= set(it.parents)


def test_children_come_back_in_parent_order_and_match_serial():
    probs = _probs()
    batch = _level(probs)
    opts = SolveOptions(paths=Thresholds(batch_size=3))
    serial, d1 = solve_level(batch, opts, chunks=1)
    lpt, d4 = solve_level(batch, opts, chunks=4)
    # the mapper may run items in any order; results are matched by position
    rev, _ = solve_level(batch, opts, chunks=4,
                         mapper=lambda f, xs: [f(x) for x in xs[::-1]][::-1])
    np.testing.assert_array_equal(lpt, rev)
    # one item or four: the same published integers (a release must not depend on the workers)
    np.testing.assert_array_equal(lpt, serial)
    for i, p in enumerate(probs):
        a, b = int(batch.child_ptr[i]), int(batch.child_ptr[i + 1])
        np.testing.assert_array_equal(lpt[a:b].sum(axis=0), p.parent)
    assert d4.parents == d1.parents == batch.n_parents
    assert d4.children == d1.children


def test_take_and_child_rows():
    probs = _probs()
    batch = _level(probs)
    idx = [6, 0, 10, 5]
    sub = batch.take(idx)
    assert isinstance(sub, _LB) and sub.n_parents == 4
    rows = batch.child_rows(idx)
    for j, i in enumerate(idx):
        a, b = int(batch.child_ptr[i]), int(batch.child_ptr[i + 1])
        np.testing.assert_array_equal(rows[sub.child_ptr[j]:sub.child_ptr[j + 1]], np.arange(a, b))
        np.testing.assert_array_equal(sub.parents[j], batch.parents[i])
        assert sub.label(j) == batch.label(i)
    for q in batch.targets:
        np.testing.assert_array_equal(sub.targets[q], batch.targets[q][rows])
