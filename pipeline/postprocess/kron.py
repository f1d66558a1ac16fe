"""Exact ``(H + rho I)^-1`` on the full cell grid by Kronecker algebra.

Each query is a tensor product over the attribute axes of a factor ``R^T R``: ``I`` (axis
kept), ``J = 11^T`` (summed out) or a recode's block matrix. On an axis where every factor is
``I`` or ``J`` ("simple" axis) both are diagonal in the split {constant, mean-zero}; the other
("dense") axes are kept as small dense blocks. With T the set of simple axes in the constant
class, ``H = sum_T B_T (x) P_T`` and ``(H + rho I)^-1 = sum_T (B_T + rho I)^-1 (x) P_T``; a
Moebius inversion turns that into sums of axis means (notes, section 3.2). For PL94 this is
8 matrices of 8 x 8, and applying the inverse to (k, 2016) data is a few passes over memory.
"""

from __future__ import annotations

import itertools

import numpy as np

from pipeline.model.spec import HistogramSpec


def _axis_factor(spec: HistogramSpec, query: str, axis: int) -> np.ndarray:
    """The (n_a, n_a) factor ``R^T R`` of ``query`` on ``axis``."""
    attr = spec.attributes[axis]
    for f in spec.query(query).by:
        name, m, _ = spec.factor_map(f)
        if name == attr.name:
            return (m[:, None] == m[None, :]).astype(np.float64)
    return np.ones((attr.size, attr.size))


def _is_simple(F: np.ndarray) -> bool:
    return bool(np.array_equal(F, np.eye(F.shape[0])) or np.all(F == 1.0))


class KronInverse:
    """``(H + rho I)^-1`` for ``H = sum_q w_q Q_q^T Q_q`` over all cells of ``spec``.

    ``weights`` are per-query scalars (every answer of a query measured). ``extra`` adds a
    penalty weight per query on top (used for the ADMM splitting of bounds on a query).
    """

    def __init__(self, spec: HistogramSpec, weights: dict[str, float]):
        self.spec = spec
        self.shape = spec.shape
        self.names = tuple(weights)
        self.weights = dict(weights)
        na = len(self.shape)
        factors = {q: [_axis_factor(spec, q, a) for a in range(na)] for q in self.names}
        self.simple = [a for a in range(na) if all(_is_simple(factors[q][a]) for q in self.names)]
        self.dense = [a for a in range(na) if a not in self.simple]
        self.d = int(np.prod([self.shape[a] for a in self.dense])) if self.dense else 1
        if self.d > 1024:
            raise ValueError(f"spec {spec.name!r}: dense Kronecker block {self.d} too large")
        self.perm = tuple(self.dense + self.simple)
        self.subsets = [
            T for r in range(len(self.simple) + 1) for T in itertools.combinations(self.simple, r)
        ]
        # per query: dense block and, per simple axis, whether it is J (summed out)
        self._dense_q: dict[str, np.ndarray] = {}
        self._is_j: dict[str, dict[int, bool]] = {}
        for q in self.names:
            D = np.ones((1, 1))
            for a in self.dense:
                D = np.kron(D, factors[q][a])
            self._dense_q[q] = D
            self._is_j[q] = {a: bool(np.all(factors[q][a] == 1.0)) for a in self.simple}
        self.rho = 0.0  # set by set_rho before apply
        self.extra: dict[str, float] = {}
        self._D: dict | None = None  # Moebius coefficients of H itself (forward), lazy
        self._plan: dict | None = None  # work arrays of _apply for the last k

    def block(self, T: tuple[int, ...], extra: dict[str, float] | None = None) -> np.ndarray:
        """``B_T``: the (d, d) block of H on the class where axes T are constant."""
        B = np.zeros((self.d, self.d))
        w = dict(self.weights)
        for q, e in (extra or {}).items():
            w[q] = w.get(q, 0.0) + e
        for q, wq in w.items():
            if wq == 0.0:
                continue
            if q not in self._dense_q:
                raise ValueError(f"query {q!r} not part of this operator")
            lam = 1.0
            for a in self.simple:
                if self._is_j[q][a]:
                    lam *= self.shape[a] if a in T else 0.0
            B += wq * lam * self._dense_q[q]
        return B

    def eig_range(self) -> tuple[float, float]:
        """(lambda_min, lambda_max) of H over all cells (exact, from the blocks)."""
        ev = np.concatenate([np.linalg.eigvalsh(self.block(T)) for T in self.subsets])
        return float(ev.min()), float(ev.max())

    def set_rho(self, rho: float, extra: dict[str, float] | None = None) -> None:
        """Prepare ``(H + extra terms + rho I)^-1``; costs 2^m small inversions."""
        self.rho = float(rho)
        self.extra = dict(extra or {})
        A = {
            T: np.linalg.inv(self.block(T, self.extra) + self.rho * np.eye(self.d))
            for T in self.subsets
        }
        self.C = self._moebius(A)

    def _moebius(self, A: dict) -> dict:
        """Per-class blocks ``A_T`` -> coefficients ``C_S`` of the axis means (notes, 3.2)."""
        return {
            S: sum(
                (-1) ** (len(S) - len(T)) * A[T] for T in self.subsets if set(T) <= set(S)
            )
            for S in self.subsets
        }

    def forward(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``H X`` for ``X`` (k, n_cells) (the weights of the constructor, no rho or extra
        terms): the same sums-of-axis-means evaluation as :meth:`apply` with the blocks
        ``B_T`` in place of their inverses."""
        if self._D is None:
            self._D = self._moebius({T: self.block(T) for T in self.subsets})
        return self._apply(self._D, X, out)

    def apply(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Apply the prepared inverse to ``X`` (k, n_cells) -> (k, n_cells).

        ``out`` (k, n_cells), C-contiguous and not overlapping ``X``, receives the result.
        Axis means are built from the next larger subset's means (one pass over X for the
        largest ones); the small per-subset terms ``C_S M_S`` are accumulated into one
        another from the smallest up, so only the one-axis terms are added to the full
        array (a few passes over memory in all, no full-size temporaries on the PL94 grid).
        """
        return self._apply(self.C, X, out)

    def _work(self, k: int) -> dict:
        """Per-k plan and work arrays of :meth:`_apply`, kept between calls: the same shapes
        recur every ADMM iteration, and fresh large arrays cost page faults each time."""
        if self._plan is None or self._plan["k"] != k:
            simple_shape = tuple(self.shape[a] for a in self.simple)
            pos = {a: i + 2 for i, a in enumerate(self.simple)}
            shape: dict[tuple[int, ...], tuple[int, ...]] = {(): (k, self.d) + simple_shape}
            steps = []
            for S in self.subsets[1:]:  # by size: every S minus one axis is already there
                parent = min((tuple(b for b in S if b != a) for a in S),
                             key=lambda T: int(np.prod(shape[T])))
                a = next(b for b in S if b not in parent)
                sh = list(shape[parent])
                sh[pos[a]] = 1
                shape[S] = tuple(sh)
                steps.append((S, parent, pos[a]))
            adds = []
            for S in sorted(self.subsets[1:], key=len, reverse=True):
                if len(S) > 1:  # into the smallest term with one axis fewer (broadcasts)
                    parent = min((tuple(b for b in S if b != a) for a in S),
                                 key=lambda U: int(np.prod(shape[U])))
                    adds.append((S, parent))
            self._plan = {
                "k": k, "simple_shape": simple_shape, "steps": steps, "adds": adds,
                "M": {S: np.empty(shape[S]) for S in self.subsets[1:]},
                "T": {S: np.empty(shape[S]) for S in self.subsets[1:]},
                # sums instead of means: 1 / (number of cells summed) goes into C_S
                "scale": {S: 1.0 / float(np.prod([self.shape[a] for a in S]))
                          for S in self.subsets},
            }
        return self._plan

    def _apply(self, C: dict, X: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """``sum_S C_S (x) mean_S`` applied to ``X`` (k, n_cells)."""
        k = X.shape[0]
        w = self._work(k)
        identity = self.perm == tuple(range(len(self.shape)))
        simple_shape = w["simple_shape"]
        if identity:
            Y = np.ascontiguousarray(X).reshape((k, self.d) + simple_shape)
        else:
            Y = X.reshape((k,) + self.shape).transpose((0,) + tuple(a + 1 for a in self.perm))
            Y = np.ascontiguousarray(Y).reshape((k, self.d) + simple_shape)
        M, T = w["M"], w["T"]
        src = {(): Y}
        for S, parent, ax in w["steps"]:
            np.sum(src[parent], axis=ax, keepdims=True, out=M[S])
            src[S] = M[S]
        for S in self.subsets[1:]:
            np.matmul(C[S] * w["scale"][S], M[S].reshape(k, self.d, -1),
                      out=T[S].reshape(k, self.d, -1))
        for S, parent in w["adds"]:
            T[parent] += T[S]
        if identity and out is not None:
            res = out.reshape(Y.shape)
        else:
            res = np.empty_like(Y)
        np.matmul(C[()], Y.reshape(k, self.d, -1), out=res.reshape(k, self.d, -1))
        for S in self.subsets[1:]:
            if len(S) == 1:
                res += T[S]
        if identity:
            return res.reshape(k, -1)
        dense_shape = tuple(self.shape[a] for a in self.dense)
        res = res.reshape((k,) + dense_shape + simple_shape)
        inv = np.argsort((0,) + tuple(a + 1 for a in self.perm))
        full = res.transpose(tuple(inv)).reshape(k, -1)
        if out is None:
            return np.ascontiguousarray(full)
        out[...] = full
        return out
