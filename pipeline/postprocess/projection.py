"""Exact Euclidean projections used by the least-squares engine.

The consistency set of one parent is ``{X >= 0, X[c, j] = 0 where not allowed, sum_c X[:, j] = p_j}``;
it separates by cell into one scaled simplex per column, so the projection is exact
(Held-Wolfe-Crowder / Duchi et al. 2008 by sorting, or Michelot's Newton iteration).
Arrays are ``(k, n)``: k children (rows) by n cells (columns), float64.

Held child totals (row sums) make the set a transportation polytope, which is not separable;
:func:`fix_row_sums` moves a point of the column set onto it by minimum-norm corrections on
the point's support (used to certify ADMM iterates whose row sums are still slightly off), and
:func:`fit_row_col_offsets` fits ``G ~ a_c + b_j`` on the same support (dual estimates).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


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


def _clip_at(W: np.ndarray, tau: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """``max(W - tau, 0)`` per column, exactly 0 off ``allowed``: the projection at threshold tau."""
    X = np.maximum(W - tau[None, :], 0.0)
    if allowed is not None:
        X[~allowed] = 0.0
    return X


def _cumsum_rows(U: np.ndarray, min_cols: int = 128) -> np.ndarray:
    """``np.cumsum(U, axis=0)``, the same numbers (a running sum down each column): one
    vectorised add per row when there are at least ``min_cols`` columns (numpy's cumsum down
    the columns of a C-ordered array loops per column: 5-11x slower from (4, 3,264) to
    (300, 2,016); below ~128 columns the per-row calls cost more)."""
    if U.ndim != 2 or U.shape[1] < min_cols:
        return np.cumsum(U, axis=0)
    out = np.empty_like(U)
    if U.shape[0]:
        out[0] = U[0]
    for i in range(1, U.shape[0]):
        np.add(out[i - 1], U[i], out=out[i])
    return out


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
    css = _cumsum_rows(U)
    css -= p[None, :]
    cond = U - css / np.arange(1, k + 1, dtype=np.float64)[:, None] > 0
    cond[0] = True  # p_j == 0 (or all equal): keep at least one element in the support
    r = k - 1 - np.argmax(cond[::-1], axis=0)
    tau = css[r, np.arange(n)] / (r + 1)
    return _clip_at(W, tau, allowed), tau


def project_columns_warm(
    W: np.ndarray,
    p: np.ndarray,
    tau: np.ndarray,
    out: np.ndarray | None = None,
    max_iter: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """The projection of :func:`project_columns_sort`, in place and warm-started (Michelot's
    Newton iteration), for the ADMM loop.

    ``W`` (k, n) holds the points with ``-inf`` on disallowed entries; it is not modified.
    ``tau`` (n,) is a starting threshold (e.g. the previous iteration's). Michelot/Newton
    steps ``tau += (sum_j max(w - tau, 0) - p) / |{w > tau}|``: one step from any tau with a
    non-empty support lands at or below tau*, and a column is exact as soon as its support
    count repeats (supports of thresholds are nested). While most columns still move, all
    columns are re-evaluated (settled ones with their tau frozen, so unchanged); once few
    remain they are gathered and handled on their own, so late ADMM iterations cost about
    two passes. ``out`` (k, n) receives X. Returns ``(X, tau)`` like
    :func:`project_columns_sort`.
    """
    k, n = W.shape
    X = np.empty_like(W) if out is None else out
    tau = np.array(tau, dtype=np.float64, copy=True)
    settled = np.zeros(n, dtype=bool)
    prev = np.full(n, -1, dtype=np.int64)  # support count at the previous evaluation
    cols = None  # None: all columns (full arrays); else the gathered columns still moving
    Wc, Xc, pc = W, X, p
    mc = np.empty((k, n), dtype=bool)
    for step in range(max_iter):
        tc = tau if cols is None else tau[cols]
        np.subtract(Wc, tc[None, :], out=Xc)
        np.maximum(Xc, 0.0, out=Xc)
        np.greater(Xc, 0.0, out=mc)
        cnt = np.add.reduce(mc.view(np.int8), axis=0, dtype=np.int64)
        s = Xc.sum(axis=0)
        pv = prev if cols is None else prev[cols]
        st = settled if cols is None else settled[cols]
        lost = (cnt == 0) & (pc > 0)  # tau above every entry: restart at max(w) - p <= tau*
        done = st | ((cnt == 0) & (pc <= 0)) | ((cnt == pv) & (step > 0) & ~lost)
        new = np.where(done, tc, tc + (s - pc) / np.maximum(cnt, 1))
        if lost.any():
            e = np.flatnonzero(lost)
            new[e] = Wc[:, e].max(axis=0) - pc[e]
        if cols is None:
            tau[:] = new
            settled |= done
            prev[:] = cnt
        else:
            tau[cols] = new
            settled[cols] = done
            prev[cols] = cnt
            X[:, cols] = Xc
        if done.all():
            return X, tau
        if cols is None and 2 * int(settled.sum()) < n:
            continue  # most columns still moving: a gather would cost more than it saves
        cols = np.flatnonzero(~settled)
        Wc = W[:, cols]
        Xc = np.empty_like(Wc)
        mc = np.empty(Wc.shape, dtype=bool)
        pc = p[cols]
    # not settled after max_iter steps (should not happen): exact sort on those columns
    rest = np.flatnonzero(~settled)
    Wr = W[:, rest]
    Xs, ts = project_columns_sort(np.where(np.isfinite(Wr), Wr, 0.0), p[rest],
                                  np.isfinite(Wr))
    X[:, rest] = Xs
    tau[rest] = ts
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


def _support_solve(
    rows: np.ndarray, cols: np.ndarray, k: int, n: int, rr: np.ndarray, rc: np.ndarray,
    maxiter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(a, b)`` for ``sum_{j in S_c} (a_c + b_j) = rr_c`` and
    ``sum_{c in S_j} (a_c + b_j) = rc_j`` on the bipartite support ``S = {(rows, cols)}``.

    The matrix ``[[D_r, B], [B', D_c]]`` (B the 0/1 support pattern) is the signless Laplacian
    of a bipartite graph: PSD, null vector ``(1, -1)`` per connected component. Jacobi-
    preconditioned CG; components where the right-hand side is inconsistent get a least-squares
    answer, which the callers check.
    """
    B = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(k, n))
    BT = B.T.tocsr()
    dr = np.diff(B.indptr).astype(np.float64)
    dc = np.diff(BT.indptr).astype(np.float64)
    d = np.maximum(np.concatenate([dr, dc]), 1.0)

    def mv(x: np.ndarray) -> np.ndarray:
        a, b = x[:k], x[k:]
        return np.concatenate([dr * a + B @ b, BT @ a + dc * b])

    A = spla.LinearOperator((k + n, k + n), matvec=mv, dtype=np.float64)
    M = spla.LinearOperator((k + n, k + n), matvec=lambda x: x / d, dtype=np.float64)
    rhs = np.concatenate([rr, rc])
    sol, _ = spla.cg(A, rhs, rtol=1e-12, atol=0.0, M=M, maxiter=maxiter)
    return sol[:k], sol[k:]


def fix_row_sums(
    Z: np.ndarray, p: np.ndarray, t: np.ndarray, steps: int = 6, maxiter: int = 300
) -> np.ndarray:
    """Move ``Z`` (k, n), ``Z >= 0`` with column sums ``p``, towards row sums ``t`` (k,).

    Each step adds the minimum-norm correction ``a_c + b_j`` on the support ``Z > 0`` that
    makes rows sum to ``t`` and columns to ``p`` (a semismooth Newton step for the projection
    onto the transportation polytope with the support frozen), then clips at 0. Zeros of
    ``Z`` stay zero, so masks are kept. Returns a new array; row and column sums are met only
    approximately (exactly when the support keeps up), so callers re-project the columns and
    check the row error. Needs ``sum(t) == sum(p)``.
    """
    k, n = Z.shape
    Z = np.array(Z, dtype=np.float64, copy=True)
    scale = max(float(np.abs(t).max(initial=0.0)), 1.0)
    for _ in range(steps):
        er = t - Z.sum(axis=1)
        ec = p - Z.sum(axis=0)
        if max(np.abs(er).max(initial=0.0), np.abs(ec).max(initial=0.0)) <= 1e-13 * scale:
            break
        rows, cols = np.nonzero(Z > 0)
        if rows.size == 0:
            break
        a, b = _support_solve(rows, cols, k, n, er, ec, maxiter)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            break
        Z[rows, cols] += a[rows] + b[cols]
        np.maximum(Z, 0.0, out=Z)
    return Z


def fit_row_col_offsets(
    Z: np.ndarray, G: np.ndarray, maxiter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit ``G[c, j] ~ a_c + b_j`` over the support ``Z > 0`` of ``Z`` (k, n).

    At a KKT point of ``min f`` over the transportation polytope the gradient is exactly
    ``alpha_c + tau_j`` on the support, so ``a`` estimates the row-sum multipliers.
    Returns ``(a (k,), b (n,))``.
    """
    k, n = Z.shape
    rows, cols = np.nonzero(Z > 0)
    g = G[rows, cols]
    rr = np.bincount(rows, weights=g, minlength=k)
    rc = np.bincount(cols, weights=g, minlength=n)
    return _support_solve(rows, cols, k, n, rr, rc, maxiter)
