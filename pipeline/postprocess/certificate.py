"""The one suboptimality certificate of the least squares, for one parent or a batch of them.

Arrays are either one parent's ``(k, n)`` (children x domain cells) or a batch's ``(P, K, n)``
(padded, see ``admm._Group``): every reduction below names its axis from the end (children
-2, cells -1), so the same code serves both and returns a float or a ``(P,)`` array.

With Lagrangian ``g = f - sum alpha_c (1'z_c - t_c) - sum nu (G z - l)`` (nu >= 0),
``f* >= g* >= g(Z) - max_S [<grad g, Z - S> - mu/2 |Z - S|^2]`` over S in C1, the max
attained at ``S = Proj_C1(Z - grad g / mu)`` (Frank-Wolfe vertex when mu = 0). The bound is
valid at every C1 point Z, also one whose row totals or lower bounds are not met yet.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class CertificateOps(Protocol):
    """What the certificate needs of a layout (one parent or a padded batch).

    ``mu``: strong-convexity modulus of f (float or ``(P,)``); ``p``: parent on the domain
    ``(n,)`` / ``(P, n)``; ``allowed``: bool like Z; ``consistency``: per-cell parent sums are
    constraints (False only at the root); ``totals``: held row totals ``(k,)`` / ``(P, K)`` or
    None, ``held``: rows whose total is held (None: all); ``lower``: bounds on ``G Z`` or None.
    """

    @property
    def mu(self) -> float | np.ndarray: ...
    @property
    def p(self) -> np.ndarray: ...
    @property
    def allowed(self) -> np.ndarray: ...
    @property
    def consistency(self) -> bool: ...
    @property
    def totals(self) -> np.ndarray | None: ...
    @property
    def held(self) -> np.ndarray | None: ...
    @property
    def lower(self) -> np.ndarray | None: ...

    def bound_answer(self, X: np.ndarray) -> np.ndarray:
        """``G X`` per child."""

    def bound_back_add(self, R: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``R += G' A`` in place."""

    def project_cert(self, V: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Projection of ``V`` (scratch) onto C1 into ``out``."""

    def scratch(self, i: int, like: np.ndarray) -> np.ndarray:
        """Work array number ``i`` shaped like ``like`` (may be kept between calls)."""

    def neg_mask(self) -> np.ndarray | None:
        """0 on allowed entries, -inf elsewhere; None when every entry is allowed."""


def pdot(A: np.ndarray, B: np.ndarray) -> float | np.ndarray:
    """Per-parent ``<A, B>`` over the last two axes: a float for (k, n), ``(P,)`` for (P, K, n)."""
    if A.ndim == 2:
        return float(np.vdot(A, B))
    return np.einsum("pkn,pkn->p", A, B)


def _rows_and_answers(ops: CertificateOps,
                      Z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Row sums of Z (when totals are held) and ``G Z`` (when bounded), each computed once."""
    rows = Z.sum(axis=-1) if ops.totals is not None else None
    GZ = ops.bound_answer(Z) if ops.lower is not None else None
    return rows, GZ


def _infeasibility(ops: CertificateOps, Z: np.ndarray, rows: np.ndarray | None,
                   GZ: np.ndarray | None) -> np.ndarray:
    v: float | np.ndarray = 0.0 if Z.ndim == 2 else np.zeros(Z.shape[0])
    if ops.totals is not None and rows is not None:
        rs = np.abs(rows - ops.totals)
        if ops.held is not None:
            rs = np.where(ops.held, rs, 0.0)
        v = np.maximum(v, rs.max(axis=-1, initial=0.0))
    if ops.lower is not None and GZ is not None:
        v = np.maximum(v, np.max(ops.lower - GZ, axis=(-2, -1), initial=0.0))
    return np.asarray(v, dtype=np.float64)


def infeasibility(ops: CertificateOps, Z: np.ndarray) -> np.ndarray:
    """Largest violation of the held row totals and lower bounds at Z (persons), per parent:
    a 0-d array for one parent's (k, n), ``(P,)`` for a batch."""
    return _infeasibility(ops, Z, *_rows_and_answers(ops, Z))


def certificate(
    ops: CertificateOps, Z: np.ndarray, f: float | np.ndarray, grad: np.ndarray,
    alpha: np.ndarray | None, nu: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lower bound on f*, KKT spread, infeasibility)`` at a C1 point Z: :func:`lower_bound`
    and :func:`infeasibility` sharing Z's row sums and bound answers."""
    rows, GZ = _rows_and_answers(ops, Z)
    lb, spread = _lower_bound(ops, Z, f, grad, alpha, nu, rows, GZ)
    return lb, spread, _infeasibility(ops, Z, rows, GZ)


def lower_bound(
    ops: CertificateOps, Z: np.ndarray, f: float | np.ndarray, grad: np.ndarray,
    alpha: np.ndarray | None, nu: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower bound on f*, KKT spread)`` (0-d arrays for one parent, ``(P,)`` for a batch)
    from a C1-feasible ``Z`` with ``(f, grad)`` of f at Z and any multipliers ``alpha`` (row
    totals, 0 on rows not held) / ``nu >= 0`` (lower bounds). The spread is
    ``max_j (max_{c: z_cj > 0} grad_cj - min_{c allowed} grad_cj)`` of the Lagrangian
    gradient, 0 at a KKT point (root: ``max |grad|`` on the support)."""
    return _lower_bound(ops, Z, f, grad, alpha, nu, *_rows_and_answers(ops, Z))


def _lower_bound(
    ops: CertificateOps, Z: np.ndarray, f: float | np.ndarray, grad: np.ndarray,
    alpha: np.ndarray | None, nu: np.ndarray | None, rows: np.ndarray | None,
    GZ: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    one = Z.ndim == 2
    g = f if one else np.array(f, dtype=np.float64, copy=True)
    # the Lagrangian gradient goes to a work array (large parents: fresh (k, n) temporaries
    # page-fault on every check)
    G = ops.scratch(0, Z)
    np.copyto(G, grad)
    if alpha is not None and ops.totals is not None and rows is not None:
        g = g - np.sum(alpha * (rows - ops.totals), axis=-1)
        G -= alpha[..., None]
    if nu is not None and ops.lower is not None and GZ is not None:
        g = g - np.sum(nu * (GZ - ops.lower), axis=(-2, -1))
        ops.bound_back_add(G, -nu)
    mu = np.asarray(ops.mu, dtype=np.float64)
    strong = mu > 0
    bound: float | np.ndarray = 0.0
    if strong.any():
        V = ops.scratch(1, Z)
        safe = np.where(strong, mu, 1.0)
        np.multiply(G, (-1.0 / safe)[..., None, None], out=V)
        V += Z
        # exact projection (the one-parent layout warm-starts it from the previous check's
        # thresholds: the points of successive checks are close)
        S = ops.project_cert(V, ops.scratch(2, Z))
        D = np.subtract(Z, S, out=ops.scratch(1, Z))
        bound = pdot(G, D) - 0.5 * mu * pdot(D, D)
    if not strong.all():
        neg = ops.neg_mask()
        if ops.consistency:
            gm = G if neg is None else np.where(ops.allowed, G, np.inf)
            low = gm.min(axis=-2, initial=np.inf)
            low = np.where(np.isfinite(low), low, 0.0)
            fw = pdot(G, Z) - np.sum(low * ops.p, axis=-1)
        elif np.any(G[ops.allowed] < 0):
            fw = np.inf  # min of a linear function over the orthant is unbounded
        else:
            fw = pdot(G, Z)
        bound = np.where(strong, bound, fw)
    lb = g - np.maximum(bound, 0.0)
    if ops.consistency and Z.shape[-2]:
        # min over allowed / max over the support of G per cell, via +-inf work arrays
        W = ops.scratch(1, Z)
        neg = ops.neg_mask()
        if neg is None:
            gmin = G.min(axis=-2)
        else:
            np.subtract(G, neg, out=W)  # +inf off allowed
            gmin = W.min(axis=-2)
        np.copyto(W, G)
        W[Z <= 0] = -np.inf
        gmax = W.max(axis=-2)
        ok = np.isfinite(gmax) & np.isfinite(gmin)
        spread = np.max(np.where(ok, gmax - gmin, 0.0), axis=-1, initial=0.0)
    else:
        spread = np.max(np.where(Z > 0, np.abs(G), 0.0), axis=(-2, -1), initial=0.0)
    return np.asarray(lb, dtype=np.float64), np.asarray(spread, dtype=np.float64)
