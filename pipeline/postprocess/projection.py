"""Exact Euclidean projections used by the least-squares engine.

The consistency set of one parent is ``{X >= 0, X[c, j] = 0 where not allowed, sum_c X[:, j] = p_j}``;
it separates by cell into one scaled simplex per column, so the projection is exact
(Held-Wolfe-Crowder / Duchi et al. 2008 by sorting, or Michelot's Newton iteration).
Arrays are ``(k, n)``: k children (rows) by n cells (columns), float64.
"""

from __future__ import annotations

import numpy as np


def _mask_out(V: np.ndarray, p: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Replace disallowed entries by a value that the projection sends to exactly 0.

    For a column with sum p the threshold tau is at least ``max(v) - p``, so any value below
    ``max(allowed v) - p - 1`` ends up under tau and is clipped to 0.
    """
    if allowed is None:
        return V
    big = np.where(allowed, V, -np.inf).max(axis=0)
    big = np.where(np.isfinite(big), big, 0.0)
    return np.where(allowed, V, (big - p - 1.0)[None, :])


def project_columns_sort(
    V: np.ndarray, p: np.ndarray, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Project every column of ``V`` (k, n) onto ``{x >= 0, sum x = p_j, x = 0 off allowed}``.

    Sorting version, O(k log k) per column, vectorised over all columns. A column with no
    allowed entry must have ``p_j = 0`` (returns zeros). Returns ``(X, tau)`` with
    ``X = max(V - tau, 0)`` on allowed entries and ``tau`` of shape ``(n,)``.
    """
    V = np.asarray(V, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    k, n = V.shape
    W = _mask_out(V, p, allowed)
    U = -np.sort(-W, axis=0)
    css = np.cumsum(U, axis=0) - p[None, :]
    cond = U - css / np.arange(1, k + 1, dtype=np.float64)[:, None] > 0
    cond[0] = True  # p_j == 0 (or all equal): keep at least one element in the support
    r = k - 1 - np.argmax(cond[::-1], axis=0)
    tau = css[r, np.arange(n)] / (r + 1)
    X = np.maximum(W - tau[None, :], 0.0)
    if allowed is not None:
        X[~allowed] = 0.0
    return X, tau


def project_columns_newton(
    V: np.ndarray,
    p: np.ndarray,
    allowed: np.ndarray | None = None,
    tau0: np.ndarray | None = None,
    max_iter: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Same projection as :func:`project_columns_sort` by Michelot's Newton iteration.

    ``tau0`` warm-starts the threshold (one Newton step from any point with a non-empty
    support lands at or below tau*, after which the iteration increases monotonically).
    Exact after finitely many steps; stops when the support no longer changes.
    """
    V = np.asarray(V, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    k, n = V.shape
    W = _mask_out(V, p, allowed)
    tau = (W.sum(axis=0) - p) / k  # <= tau*: the full support is a superset of the true one
    if tau0 is not None:
        ok = (W > tau0[None, :]).any(axis=0)
        tau = np.where(ok, np.asarray(tau0, dtype=np.float64), tau)
    prev = None
    for _ in range(max_iter):
        S = W > tau[None, :]
        cnt = S.sum(axis=0)
        new = np.where(cnt > 0, ((W * S).sum(axis=0) - p) / np.maximum(cnt, 1), tau)
        if prev is not None and np.array_equal(cnt, prev):
            tau = new
            break
        tau, prev = new, cnt
    X = np.maximum(W - tau[None, :], 0.0)
    if allowed is not None:
        X[~allowed] = 0.0
    return X, tau


def project_capped_simplex(
    y: np.ndarray, total: float, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """Project ``y`` (k,) onto ``{lower <= t <= upper, sum t = total}`` (Euclidean).

    The solution is ``clip(y - tau, lower, upper)`` with tau the root of a monotone
    piecewise-linear function, found exactly between its breakpoints. Raises ``ValueError``
    when ``sum(lower) > total`` or ``sum(upper) < total`` (empty set).
    """
    y = np.asarray(y, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if lower.sum() > total + 1e-9 or upper.sum() < total - 1e-9:
        raise ValueError(
            f"capped simplex is empty: sum(lower)={lower.sum()}, sum(upper)={upper.sum()}, "
            f"total={total}"
        )
    bps = np.unique(np.concatenate([y - lower, y - upper]))

    def phi(t: np.ndarray) -> np.ndarray:
        return np.clip(y[None, :] - t[:, None], lower, upper).sum(axis=1) - total

    vals = phi(bps)  # non-increasing in tau
    # the root lies between the last breakpoint with phi >= 0 and the first with phi <= 0
    i = np.searchsorted(-vals, 0.0, side="left")
    if i < bps.size and vals[i] == 0.0:
        tau = bps[i]
    elif i == 0:
        tau = bps[0]
    elif i == bps.size:
        tau = bps[-1]
    else:
        t0, t1, f0, f1 = bps[i - 1], bps[i], vals[i - 1], vals[i]
        tau = t0 + (t1 - t0) * f0 / (f0 - f1)  # phi is linear between breakpoints
    return np.clip(y - tau, lower, upper)
