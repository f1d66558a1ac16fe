"""Exact projections: sort vs Newton, ties, zeros, masks, capped simplex."""

import numpy as np
import pytest

from pipeline.postprocess.projection import (
    project_capped_simplex,
    project_columns_newton,
    project_columns_sort,
)


def _kkt_ok(V, X, p, allowed):
    # projection onto a scaled simplex: X = max(V - tau, 0) on allowed, sums p
    assert (X >= 0).all()
    np.testing.assert_allclose(X.sum(axis=0), p, atol=1e-9)
    if allowed is not None:
        assert (X[~allowed] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_sort_and_newton_agree(seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(1, 40)), 200
    V = rng.normal(0, 3, (k, n))
    p = rng.integers(0, 20, n).astype(float)
    Xs, _ = project_columns_sort(V, p)
    Xn, _ = project_columns_newton(V, p)
    _kkt_ok(V, Xs, p, None)
    np.testing.assert_allclose(Xs, Xn, atol=1e-12)
    # warm start from the solution's threshold and from a wrong one
    _, tau = project_columns_sort(V, p)
    np.testing.assert_allclose(project_columns_newton(V, p, tau0=tau + 1.0)[0], Xs, atol=1e-12)
    np.testing.assert_allclose(project_columns_newton(V, p, tau0=tau - 5.0)[0], Xs, atol=1e-12)


def test_projection_is_nearest_point():
    # compare with a brute-force check: no feasible direction improves the distance
    rng = np.random.default_rng(7)
    V = rng.normal(0, 2, (6, 50))
    p = rng.integers(0, 5, 50).astype(float)
    X, tau = project_columns_sort(V, p)
    for _ in range(200):
        j = rng.integers(50)
        a, b = rng.choice(6, 2, replace=False)
        eps = min(1e-3, X[b, j])
        if eps <= 0:
            continue
        Y = X.copy()
        Y[a, j] += eps
        Y[b, j] -= eps
        assert np.sum((Y - V) ** 2) >= np.sum((X - V) ** 2) - 1e-15


def test_ties_and_zero_columns():
    V = np.zeros((5, 4))
    V[:, 1] = 1.0  # all tied
    V[:2, 2] = 3.0  # tie at the top
    p = np.array([0.0, 2.0, 1.0, 5.0])
    for proj in (project_columns_sort, project_columns_newton):
        X, _ = proj(V, p)
        _kkt_ok(V, X, p, None)
        np.testing.assert_allclose(X[:, 0], 0.0)
        np.testing.assert_allclose(X[:, 1], 0.4)
        np.testing.assert_allclose(X[:, 2], [0.5, 0.5, 0, 0, 0])
        np.testing.assert_allclose(X[:, 3], 1.0)


def test_masked_entries_are_zero_and_rest_is_projection():
    rng = np.random.default_rng(3)
    V = rng.normal(0, 3, (8, 30))
    allowed = rng.random((8, 30)) < 0.6
    allowed[0] = True
    p = rng.integers(0, 10, 30).astype(float)
    Xs, _ = project_columns_sort(V, p, allowed)
    Xn, _ = project_columns_newton(V, p, allowed)
    _kkt_ok(V, Xs, p, allowed)
    np.testing.assert_allclose(Xs, Xn, atol=1e-12)
    for j in range(30):  # equals the projection of the allowed sub-vector
        a = allowed[:, j]
        ref, _ = project_columns_sort(V[a, j][:, None], p[j:j + 1])
        np.testing.assert_allclose(Xs[a, j], ref[:, 0], atol=1e-12)


def test_capped_simplex():
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(1, 30))
        y = rng.normal(10, 8, k)
        lo = rng.integers(0, 3, k).astype(float)
        hi = lo + rng.integers(0, 30, k)
        total = float(rng.uniform(lo.sum(), hi.sum()))
        t = project_capped_simplex(y, total, lo, hi)
        assert abs(t.sum() - total) < 1e-8
        assert (t >= lo - 1e-12).all() and (t <= hi + 1e-12).all()
        # KKT: t = clip(y - tau) for one tau over the free coordinates
        free = (t > lo + 1e-9) & (t < hi - 1e-9)
        if free.any():
            taus = (y - t)[free]
            assert np.ptp(taus) < 1e-8
            tau = taus[0]
            at_lo = (t <= lo + 1e-9) & (lo < hi)
            at_hi = (t >= hi - 1e-9) & (lo < hi)
            assert (y - tau <= lo + 1e-8)[at_lo].all()
            assert (y - tau >= hi - 1e-8)[at_hi].all()
    with pytest.raises(ValueError):
        project_capped_simplex(np.zeros(3), 10.0, np.zeros(3), np.ones(3))
