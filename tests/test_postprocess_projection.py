"""Exact projections: sort vs warm-started Newton, ties, zeros, masks, capped simplex."""

import numpy as np
import pytest

from pipeline.postprocess.projection import (
    fit_row_col_offsets,
    fix_row_sums,
    project_capped_simplex,
    project_columns_sort,
    project_columns_warm,
)


def project_columns_newton(V, p, allowed=None, tau0=None):
    """The production Newton projection (``project_columns_warm``) on plain inputs: -inf off
    ``allowed``, started from ``tau0`` or below every entry (full support)."""
    W = np.asarray(V, dtype=np.float64)
    if allowed is not None:
        W = np.where(allowed, W, -np.inf)
    if tau0 is None:
        tau0 = np.where(np.isfinite(W), W, np.inf).min(axis=0) - 1.0
        tau0 = np.where(np.isfinite(tau0), tau0, 0.0)
    return project_columns_warm(W, np.asarray(p, dtype=np.float64), tau0)


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


def _transport_point(seed, k=40, n=60, density=0.3):
    """A point Z >= 0 with a random support, its column sums p and perturbed row sums t."""
    rng = np.random.default_rng(seed)
    Z = rng.exponential(2.0, (k, n)) * (rng.random((k, n)) < density)
    Z[:, 0] = 1.0  # a dense column keeps the support graph connected
    p = Z.sum(axis=0)
    e = rng.normal(0, 0.05, k)
    t = Z.sum(axis=1) + e - e.mean()  # sum t == sum p
    return Z, p, t


@pytest.mark.parametrize("seed", range(4))
def test_fix_row_sums_meets_rows_and_columns_on_the_support(seed):
    Z, p, t = _transport_point(seed, density=0.5)
    Y = fix_row_sums(Z, p, t)
    assert (Y >= 0).all()
    assert (Y[Z == 0] == 0).all()  # zeros (masks) are kept
    np.testing.assert_allclose(Y.sum(axis=1), t, atol=1e-9)
    np.testing.assert_allclose(Y.sum(axis=0), p, atol=1e-9)
    # the correction is small: of the order of the row error, not of Z
    assert np.abs(Y - Z).max() < 10 * np.abs(t - Z.sum(axis=1)).max()


def test_fix_row_sums_is_min_norm_on_the_support():
    # with no clipping the correction a_c + b_j is the least-norm one: any other correction on
    # the support with the same row and column sums differs by a null-space move D
    # (rows and columns of D sum to 0), which is orthogonal to it
    Z, _, _ = _transport_point(9, density=0.8)
    Z += 1.0  # full support, corrections never clip
    p = Z.sum(axis=0)
    e = np.random.default_rng(0).normal(0, 0.05, Z.shape[0])
    t = Z.sum(axis=1) + e - e.mean()
    Y = fix_row_sums(Z, p, t)
    np.testing.assert_allclose(Y.sum(axis=1), t, atol=1e-9)
    C = Y - Z
    rng = np.random.default_rng(1)
    for _ in range(5):
        D = rng.normal(size=Z.shape)
        D -= D.mean(axis=0, keepdims=True)
        D -= D.mean(axis=1, keepdims=True)
        assert abs(np.sum(C * D)) < 1e-9 * np.linalg.norm(C) * np.linalg.norm(D)


@pytest.mark.parametrize("seed,scale", [(2, 0.05), (3, 2.0), (8, 2.0)])
def test_fix_row_sums_clips_and_keeps_going(seed, scale):
    # row errors push some support entries below 0: they are clipped (the support shrinks,
    # possibly cutting the support graph so that a part cannot be balanced on it any more)
    # and the next step re-solves; the result is not exact then, but much closer
    Z, p, _ = _transport_point(seed)
    rng = np.random.default_rng(seed)
    e = rng.normal(0, scale, Z.shape[0])
    t = Z.sum(axis=1) + e - e.mean()
    e0 = np.abs(t - Z.sum(axis=1)).max()
    Y = fix_row_sums(Z, p, t, steps=10)
    assert (Y >= 0).all() and (Y[Z == 0] == 0).all()
    assert ((Y == 0) & (Z > 0)).any()  # some entry was clipped
    err = max(np.abs(Y.sum(axis=0) - p).max(), np.abs(Y.sum(axis=1) - t).max())
    assert err <= 1e-4 * e0


def test_fit_row_col_offsets_recovers_exact_offsets_on_the_support():
    Z, _, _ = _transport_point(5)
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=Z.shape[0]), rng.normal(size=Z.shape[1])
    G = a[:, None] + b[None, :] + np.where(Z > 0, 0.0, rng.normal(size=Z.shape))  # noise off S
    fa, fb = fit_row_col_offsets(Z, G)
    fit = fa[:, None] + fb[None, :]
    np.testing.assert_allclose(fit[Z > 0], G[Z > 0], atol=1e-8)
    # (a, b) is defined up to a shift a + s, b - s on a connected support
    np.testing.assert_allclose(fa - fa[0], a - a[0], atol=1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_warm_newton_matches_sort_from_any_start(seed):
    # masks as -inf, ties, p = 0 columns, dead columns (no allowed entry), starts above every
    # entry, below, at the solution and at random
    rng = np.random.default_rng(seed)
    for _ in range(40):
        k, n = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        V = rng.normal(0, 3, (k, n))
        if seed % 2:
            V = np.round(V)
        allowed = rng.random((k, n)) < 0.7
        p = rng.integers(0, 15, n).astype(float)
        p[~allowed.any(axis=0)] = 0.0
        Xs, ts = project_columns_sort(V, p, allowed)
        W = np.where(allowed, V, -np.inf)
        for t0 in (ts, ts + rng.normal(0, 2, n), np.full(n, 1e3), np.full(n, -1e3)):
            out = np.full((k, n), np.nan)
            Xw, tw = project_columns_warm(W, p, t0, out=out)
            assert Xw is out
            np.testing.assert_allclose(Xw, Xs, atol=1e-10)
            assert (Xw >= 0).all() and (Xw[~allowed] == 0).all()
