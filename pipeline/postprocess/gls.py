"""Exact hierarchical GLS (the BLUE) of every unit's cell vector from all noisy measurements.

First stage of ``estimator: full`` (ARCHITECTURE §7; notes §2.2 and §3.2). No non-negativity:
the result is unbiased, exactly consistent (every parent equals the sum of its children), has
the structural zeros exactly, and comes with its exact covariance per unit.

Model
-----
A tree of levels ``0..L``; unit ``u`` has an unknown cell vector ``x_u`` (length
``d = spec.n_cells``), a parent is the sum of its children, and at level ``i`` every unit gets
``y_{u,q} = Q_q x_u + e`` with ``Var(e) = v_{i,q} I`` for each measured query ``q`` (``Q_q`` the
0/1 matrix of ``cell_to_answer``). The estimate minimises
``Σ_i Σ_u Σ_q ||Q_q x_u − y_{u,q}||² / v_{i,q}`` over the leaf vectors with ``x_Z = 0`` on the
structural-zero cells ``Z``.

The algebra (why every d×d matrix is a few tiny blocks)
-------------------------------------------------------
Per attribute ``a`` (size ``n_a``) take the finest common refinement of the partitions the
measured queries use on it (a recode's groups; a summed-out axis is one block; a kept axis is
the identity and needs no split) and split every code named by a (proper) structural-zero set
into its own block. With ``p_a`` blocks, the orthonormal basis ``U_a = [ind | perp]`` has the
normalised block indicators (``ind``, ``p_a`` columns) and a Helmert basis of the vectors that
sum to zero within each block (``perp``, supported inside one block, so exactly 0 on singleton
blocks). Every per-axis factor that occurs — ``I``, ``11ᵀ``, a recode's ``Σ_g 1_g 1_gᵀ``, a
zero-set's ``diag(1_Z)`` — maps ``ind`` to itself (a ``p_a × p_a`` matrix) and acts on ``perp``
as a scalar (1, 0, 0 and 0). Sums, products and inverses keep that form. Across attributes
``R^d`` splits into the components ``S ⊆ attributes`` (the axes taken on ``ind``):
component ``S`` has coordinates ``(⊗_{a∈S} ind_a) ⊗ (⊗_{a∉S} perp_a)`` and every matrix of the
algebra acts on it as ``M_S ⊗ I`` with ``M_S`` of size ``m_S = Π_{a∈S} p_a``. For ``Q_qᵀQ_q =
⊗_a F_{q,a}``: ``M_S = (⊗_{a∈S} F_{q,a}|ind) · Π_{a∉S} F_{q,a}|perp``. PL94 with the 2020
strategy: hhgq p=4 ({0}, {1,2,4}, {3}, {5,6,7}), voting_age p=2 (the zero splits it; its
perp is empty), hispanic and cenrace p=1: 8 non-empty components of size ≤ 8 instead of one
2016×2016 matrix.

Structural zeros: the zero projector ``D = diag(1_Z)`` is in the algebra, and in these
coordinates it is a 0/1 *diagonal* on each component's ``ind`` coordinates (its perp scalars
are 0 or 1 too). Working on the subspace ``x_Z = 0`` with the pseudo-inverse
``(ΠJΠ + D)⁻¹ − D`` (``Π = I − D``) is therefore the same as deleting the zero coordinates of
each block: we keep only each component's *free* coordinates (``m'_S ≤ m_S``). No
pseudo-measurement, so the zeros hold exactly and nothing is ill-conditioned.

The two passes (Gaussian belief propagation on the tree, information form)
-------------------------------------------------------------------------
Per level: ``A_i = Σ_q Q_qᵀQ_q / v_{i,q}`` (one block per component, shared by the level's
units) and per unit ``b_u = Σ_q Q_qᵀ y_{u,q} / v_{i,q}``.

* Up: leaf ``J = A_L``, ``h = b``. For each child ``c`` its subtree-only estimate is
  ``z_c = J_c⁻¹ h_c`` with covariance ``cov_c = J_c⁻¹``. A parent ``v`` sees its children's sum
  ``s_v = Σ_c z_c`` with covariance ``C_v = Σ_c cov_c``, so ``J_v = A_i + C_v⁻¹`` and
  ``h_v = b_v + C_v⁻¹ s_v``.
* Down: root ``x̂ = J⁻¹h``, ``P = J⁻¹``. Child ``c`` of ``v``:
  ``x̂_c = z_c + K_c (x̂_v − s_v)`` with ``K_c = cov_c C_v⁻¹``, and
  ``P_c = cov_c − K_c cov_c + K_c P_v K_cᵀ``. (Law of total variance: given ``x_v`` the data
  above ``v`` says nothing more about ``x_c``, and ``x_c | x_v, subtree data`` has mean
  ``z_c + K_c(x_v − s_v)`` and covariance ``cov_c − K_c cov_c``; the posterior of ``x_v`` adds
  ``K_c P_v K_cᵀ``. With a flat prior the posterior covariance is the GLS covariance.)

If the bottom level's queries do not identify ``x`` (``A_L`` singular on the free
coordinates), the problem has no unique BLUE and :class:`PostprocessError` is raised.

Cost: per unit, one change of basis of the measurement vector and one back (``O(d Σ_a n_a)``,
a few BLAS calls over the whole level) plus ``O(Σ_S m'_S² (m'_S + r_S))`` for the blocks
(``r_S = Π_{a∉S}(n_a − p_a)``); linear in the number of units, no Python loop over units.

Streaming: :meth:`GLSModel.upward` runs the up pass on any set of subtrees and returns their
top units' :class:`Message`; messages of several subtrees are stacked with
:func:`stack_messages` and fed as ``below`` to the up pass of the levels above;
:meth:`GLSModel.downward` runs the down pass given the top units' :class:`Posterior` (or from
the root) and returns the posterior of the ``below`` units too, to hand to each subtree.
:func:`fit` is ``downward(upward(levels))``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pipeline.model.geography import sum_children
from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.problem import PostprocessError

#: relative tolerance of the algebra self-checks and of the identifiability test
_ALG_TOL = 1e-10
_ID_TOL = 1e-12
#: units per chunk in the cell <-> component changes of basis (bounds the temporaries)
_CHUNK = 256


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class LevelMeasurements:
    """One level of the tree and its noisy measurements.

    ``child_ptr``: int64 ``(n_above + 1,)`` CSR offsets of this level's units under the level
    above (``None`` for the top level of a call: the root, or a subtree's top).
    ``measured``: query name -> (values float64 ``(n_units, n_answers)`` in persons, variance
    per answer in persons²). Every answer must be measured (no NaN).
    ``summed``: the values are instead each parent's units' values summed, ``(n_above,
    n_answers)`` (``child_ptr`` then sizes the level): all that an up pass without leaf means
    reads of the leaf level (:meth:`GLSModel.upward`), one row per parent instead of per leaf.
    """

    child_ptr: np.ndarray | None
    measured: Mapping[str, tuple[np.ndarray, float]]
    name: str = ""
    summed: bool = False


# --------------------------------------------------------------------------------------------
# the algebra


@dataclass(frozen=True)
class _Axis:
    n: int
    p: int
    U: np.ndarray  # (n, n) orthonormal, columns [:p] block indicators, [p:] Helmert perp
    blocks: tuple[tuple[int, ...], ...]  # positions of each block, in ind-column order


@dataclass(frozen=True)
class _Component:
    in_ind: tuple[bool, ...]  # per attribute: on ind (in S) or on perp
    m: int  # Π_{a∈S} p_a
    r: int  # Π_{a∉S} (n_a − p_a)
    free: np.ndarray  # int64 (m',) ind coordinates that are not structural zeros
    perm: tuple[int, ...]  # axes of the (unit, *attrs) tensor: unit, S axes, other axes
    dims: tuple[int, ...]  # sizes of the attribute axes in perm order (without the unit)


def _refine(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Common refinement of two partitions given as label arrays (labels by first occurrence)."""
    _, first, inv = np.unique(np.stack([labels, other], 1), axis=0, return_index=True,
                              return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel so block ids follow first position
    return np.asarray(order[inv.reshape(-1)], dtype=np.int64)


def _helmert_perp(blocks: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """Orthonormal basis of the vectors summing to 0 within every block, each vector supported
    inside one block (so it is exactly 0 on singleton blocks, i.e. on structural-zero codes)."""
    cols = []
    for b in blocks:
        for k in range(1, len(b)):
            v = np.zeros(n)
            v[list(b[:k])] = 1.0
            v[b[k]] = -float(k)
            cols.append(v / np.sqrt(k * (k + 1.0)))
    return np.stack(cols, 1) if cols else np.zeros((n, 0))


class GLSModel:
    """The algebra of one spec and one set of measured queries, and the two passes.

    Build it once for the whole tree (every subtree of a streamed run must share it: messages
    are in its coordinates). ``queries``: every query measured at any level.
    """

    def __init__(self, spec: HistogramSpec, queries: Iterable[str]) -> None:
        self.spec = spec
        self.queries: tuple[str, ...] = tuple(sorted(set(queries)))
        for q in self.queries:
            spec.query(q)  # SpecError for an unknown query
        shape = spec.shape
        self.shape = shape
        self.n_cells = spec.n_cells
        na = len(shape)
        # per query and axis: the group of each position (None = identity, i.e. kept as is)
        self._factor_maps: dict[str, list[np.ndarray | None]] = {}
        for q in self.queries:
            maps: list[np.ndarray | None] = [np.zeros(n, dtype=np.int64) for n in shape]
            for f in spec.query(q).by:
                attr, m, _ = spec.factor_map(f)
                ax = spec.axis(attr)
                maps[ax] = None if f == attr else m
            self._factor_maps[q] = maps
        # structural-zero sets per definition and axis (None = the whole axis)
        zsets: list[list[np.ndarray | None]] = []
        for _, where in spec.structural_zero_defs:
            row: list[np.ndarray | None] = [None] * na
            for attr_name, codes in where.items():
                ax = spec.axis(attr_name)
                pos = np.unique(spec.attribute(attr_name).index_of(np.array(codes)))
                if pos.size < shape[ax]:
                    row[ax] = pos
            zsets.append(row)
        self._zsets = zsets
        self.axes: tuple[_Axis, ...] = tuple(self._axis(a) for a in range(na))
        self._check_algebra()
        self.components: tuple[_Component, ...] = self._components()
        self._block_cache: dict[tuple[str, tuple[bool, ...]], np.ndarray] = {}

    # -- construction -------------------------------------------------------------------

    def _axis(self, a: int) -> _Axis:
        n = self.shape[a]
        labels = np.zeros(n, dtype=np.int64)
        for q in self.queries:
            m = self._factor_maps[q][a]
            if m is not None:
                labels = _refine(labels, m)
        for row in self._zsets:
            pos = row[a]
            if pos is not None:
                # every code of a proper zero set becomes a singleton block: then diag(1_Z) is
                # diagonal on ind and 0 on perp (perp vectors vanish on singletons)
                single = np.full(n, -1, dtype=np.int64)
                single[pos] = np.arange(pos.size)
                labels = _refine(labels, single)
        p = int(labels.max()) + 1
        blocks = tuple(tuple(int(i) for i in np.flatnonzero(labels == b)) for b in range(p))
        ind = np.zeros((n, p))
        for b, pos_b in enumerate(blocks):
            ind[list(pos_b), b] = 1.0 / np.sqrt(len(pos_b))
        U = np.concatenate([ind, _helmert_perp(blocks, n)], axis=1)
        return _Axis(n=n, p=p, U=U, blocks=blocks)

    def _factor(self, q: str, a: int) -> np.ndarray:
        """``R^T R`` of query ``q`` on axis ``a`` (n_a × n_a)."""
        m = self._factor_maps[q][a]
        if m is None:
            return np.eye(self.shape[a])
        return (m[:, None] == m[None, :]).astype(np.float64)

    def _split(self, F: np.ndarray, a: int) -> tuple[np.ndarray, float]:
        """(ind block, perp scalar) of an axis factor; checks that it is in the algebra."""
        ax = self.axes[a]
        G = ax.U.T @ F @ ax.U
        p = ax.p
        scale = max(1.0, float(np.abs(F).max()))
        s = float(G[p, p]) if ax.n > p else 0.0
        off = np.concatenate([G[:p, p:].ravel(), G[p:, :p].ravel(),
                              (G[p:, p:] - s * np.eye(ax.n - p)).ravel()])
        if off.size and float(np.abs(off).max()) > _ALG_TOL * scale:
            raise PostprocessError(f"GLS algebra: a factor on axis {a} is not block-scalar (bug)")
        return G[:p, :p].copy(), s

    def _check_algebra(self) -> None:
        self._gen: dict[str, list[tuple[np.ndarray, float]]] = {
            q: [self._split(self._factor(q, a), a) for a in range(len(self.shape))]
            for q in self.queries
        }
        for row in self._zsets:
            for a, pos in enumerate(row):
                if pos is not None:
                    F = np.zeros((self.shape[a], self.shape[a]))
                    F[pos, pos] = 1.0
                    self._split(F, a)

    def _components(self) -> tuple[_Component, ...]:
        out = []
        na = len(self.shape)
        for in_ind in itertools.product((True, False), repeat=na):
            S = [a for a in range(na) if in_ind[a]]
            rest = [a for a in range(na) if not in_ind[a]]
            m = int(np.prod([self.axes[a].p for a in S])) if S else 1
            r = int(np.prod([self.axes[a].n - self.axes[a].p for a in rest])) if rest else 1
            if r == 0:
                continue
            # zero coordinate: some zero definition covers it on every axis
            zero = np.zeros([self.axes[a].p for a in S], dtype=bool)
            for row in self._zsets:
                hit = np.ones(zero.shape, dtype=bool)
                if any(row[a] is not None for a in rest):
                    continue  # a proper zero set on a perp axis: diag(1_Z) is 0 there
                for k, a in enumerate(S):
                    pos = row[a]
                    if pos is None:
                        continue
                    inz = np.array([set(b) <= set(pos.tolist()) for b in self.axes[a].blocks])
                    hit &= inz.reshape([-1 if j == k else 1 for j in range(len(S))])
                zero |= hit
            free = np.flatnonzero(~zero.reshape(-1)).astype(np.int64)
            if free.size == 0:
                continue
            perm = (0,) + tuple(1 + a for a in S) + tuple(1 + a for a in rest)
            dims = tuple(self.axes[a].p for a in S) + tuple(self.axes[a].n - self.axes[a].p
                                                             for a in rest)
            out.append(_Component(tuple(in_ind), m, r, free, perm, dims))
        return tuple(out)

    def _slices(self, c: _Component) -> tuple[slice, ...]:
        return (slice(None),) + tuple(slice(0, ax.p) if c.in_ind[a] else slice(ax.p, ax.n)
                                      for a, ax in enumerate(self.axes))

    def block(self, q: str, c: _Component) -> np.ndarray:
        """``Q_qᵀQ_q`` on component ``c``, free coordinates: (m', m') (read-only: made once per
        model, as every level of every part asks again)."""
        key = (q, c.in_ind)
        if key not in self._block_cache:
            out = self._block(q, c)
            out.flags.writeable = False
            self._block_cache[key] = out
        return self._block_cache[key]

    def _block(self, q: str, c: _Component) -> np.ndarray:
        M = np.ones((1, 1))
        scalar = 1.0
        for a, (ind, s) in enumerate(self._gen[q]):
            if c.in_ind[a]:
                M = np.kron(M, ind)
            else:
                scalar *= s
        return (scalar * M)[np.ix_(c.free, c.free)]

    # -- changes of basis ---------------------------------------------------------------

    def to_components(self, x: np.ndarray) -> list[np.ndarray]:
        """Cell vectors ``(n, d)`` -> per component ``(n, m', r)`` (free coordinates)."""
        return self._to_components(x.shape[0], lambda lo, hi: x[lo:hi])

    def _to_components(self, n: int, rows: Callable[[int, int], np.ndarray]) -> list[np.ndarray]:
        """As :meth:`to_components`, the cell vectors made chunk by chunk by ``rows(lo, hi)``
        (so a level's Qᵀy never exists for all units at once)."""
        outs = [np.empty((n, c.free.size, c.r)) for c in self.components]
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            X = self._along_axes(rows(lo, hi), transpose=True).reshape((hi - lo,) + self.shape)
            for c, out in zip(self.components, outs):
                blk = X[self._slices(c)].transpose(c.perm).reshape(hi - lo, c.m, c.r)
                out[lo:hi] = blk[:, c.free, :]
        return outs

    def _along_axes(self, x: np.ndarray, transpose: bool) -> np.ndarray:
        """Apply ``U_aᵀ`` (``transpose``) or ``U_a`` along every attribute axis of cell vectors
        ``(n, d)`` -> ``(n, d)``: one batched matmul per axis on a (n·pre, n_a, post) view, so
        nothing is transposed in memory."""
        n = x.shape[0]
        X = np.asarray(x, dtype=np.float64)
        pre = 1
        for a, ax in enumerate(self.axes):
            post = self.n_cells // (pre * ax.n)
            M = ax.U.T if transpose else ax.U
            if post == 1:
                X = X.reshape(n * pre, ax.n) @ M.T
            else:
                X = np.matmul(M, X.reshape(n * pre, ax.n, post))
            pre *= ax.n
        return X.reshape(n, self.n_cells)

    def from_components(self, comps: Sequence[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`to_components`: per component ``(n, m', r)`` -> ``(n, d)``."""
        n = comps[0].shape[0] if comps else 0
        out = np.empty((n, self.n_cells))
        inv_perm = {c.perm: tuple(np.argsort(c.perm)) for c in self.components}
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            Y = np.zeros((hi - lo,) + self.shape)
            for c, v in zip(self.components, comps):
                blk = np.zeros((hi - lo, c.m, c.r))
                blk[:, c.free, :] = v[lo:hi]
                Y[self._slices(c)] = blk.reshape((hi - lo,) + c.dims).transpose(inv_perm[c.perm])
            out[lo:hi] = self._along_axes(Y, transpose=False)
        out[:, self.spec.structural_zero_mask] = 0.0  # already 0 up to exact arithmetic
        return out

    def pair_products(self, lefts: Sequence[Sequence[np.ndarray]], rights: Sequence[Sequence[np.ndarray]]
                      ) -> list[np.ndarray]:
        """The ``k`` pairs of Kronecker vectors ``l_j = ⊗_a lefts[j][a]``, ``r_j = ⊗_a rights[j][a]``
        (``[a]``: float ``(n_a,)``, attributes in spec order) in the components' coordinates, per
        component the ``(m'·m', k)`` matrix of ``w · u vᵀ`` on the free coordinates (``u, v``:
        the ``ind`` parts, ``w`` the product of the ``perp`` parts' inner products: the block is
        a scalar there). ``covᵀ`` of a unit's component block
        against it gives ``cov(l_jᵀx, r_jᵀx)`` (:meth:`LevelFit.covariances`)."""
        if len(lefts) != len(rights):
            raise PostprocessError(f"pair_products: {len(lefts)} left and {len(rights)} right vectors")
        k = len(lefts)
        sides = []
        for name, vectors in (("left", lefts), ("right", rights)):
            per_pair = []
            for factors in vectors:
                if len(factors) != len(self.axes):
                    raise PostprocessError(f"pair_products: {name} needs {len(self.axes)} factors, got {len(factors)}")
                g = []
                for a, (f, ax) in enumerate(zip(factors, self.axes)):
                    f = np.asarray(f, dtype=np.float64)
                    if f.shape != (ax.n,):
                        raise PostprocessError(f"pair_products: {name} factor {a} shape {f.shape} != {(ax.n,)}")
                    t = ax.U.T @ f
                    g.append((t[:ax.p], t[ax.p:]))
                per_pair.append(g)
            sides.append(per_pair)
        out: list[np.ndarray] = []
        for c in self.components:
            mf = c.free.size
            outer = np.zeros((k, mf, mf))
            for j, (left, right) in enumerate(zip(*sides)):
                u, v = np.ones(1), np.ones(1)
                w = 1.0
                for a, ((ind_l, perp_l), (ind_r, perp_r)) in enumerate(zip(left, right)):
                    if c.in_ind[a]:
                        # kron of vectors as an outer product (np.kron's per-call overhead avoided)
                        u, v = np.multiply.outer(u, ind_l).ravel(), np.multiply.outer(v, ind_r).ravel()
                    else:
                        w *= float(perp_l @ perp_r)
                if w != 0.0:
                    outer[j] = w * np.multiply.outer(u[c.free], v[c.free])
            out.append(outer.reshape(k, mf * mf).T.copy())
        return out

    # -- the passes -----------------------------------------------------------------------

    def _level_terms(self, lv: LevelMeasurements, i: int, n: int, means: bool = True,
                     sum_by: np.ndarray | None = None, summed: bool = False
                     ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """(A per component (m', m'), b per component (n, m', r) or None if nothing measured or
        not ``means``). ``sum_by``: int64 ``(g,)`` start of each group of consecutive units;
        then b is per group, ``(g, m', r)``, the sum of its units' b (the measurements are summed
        before the change of basis, which is linear: g rows to transform instead of n);
        ``summed``: the values are those sums already (``(g, n_answers)``, :class:`LevelMeasurements`)."""
        A = [np.zeros((c.free.size, c.free.size)) for c in self.components]
        if not lv.measured:
            return A, None
        terms: list[tuple[np.ndarray, str, float]] = []
        for q, (vals, var) in lv.measured.items():
            where = f"level {i}{f' ({lv.name})' if lv.name else ''} query {q!r}"
            if q not in self.queries:
                raise PostprocessError(f"{where}: not among the model's queries {self.queries}")
            query = self.spec.query(q)
            y = np.asarray(vals, dtype=np.float64)
            # summed values are per parent: checked where they are read (with the parents' starts)
            rows = int(sum_by.size) if summed and sum_by is not None else n
            if not (summed and sum_by is None) and y.shape != (rows, query.n_answers):
                raise PostprocessError(f"{where}: values shape {y.shape} != {(rows, query.n_answers)}")
            if means and not np.all(np.isfinite(y)):  # values unused without means (the margins' zeros)
                raise PostprocessError(
                    f"{where}: {int((~np.isfinite(y)).sum())} unmeasured (NaN/inf) answers; the "
                    "full estimator needs every answer measured")
            v = float(var)
            if not (np.isfinite(v) and v > 0):
                raise PostprocessError(f"{where}: variance must be finite and > 0, got {var!r}")
            terms.append((y if sum_by is None or summed else sum_children(y, sum_by), q, v))
            for k, c in enumerate(self.components):
                A[k] += self.block(q, c) / v

        def qty(lo: int, hi: int) -> np.ndarray:
            b = np.zeros((hi - lo,) + self.shape)
            for y, q, v in terms:
                # Q^T y: every cell gets its answer's value; a broadcast add (answers laid out
                # on the kept axes, recodes expanded by their group map) instead of a gather
                b += self._expand(q, y[lo:hi]) * (1.0 / v)
            return b

        if not means:
            return A, None
        if sum_by is not None:
            n = int(sum_by.size)
        if not any(np.any(y) for y, _, _ in terms):
            # Qᵀ0 = 0: the margins of error fit the design alone on zero data (the covariances
            # never depend on the data), so the change of basis of the data is skipped
            return A, [np.zeros((n, c.free.size, c.r)) for c in self.components]
        return A, self._to_components(n, qty)

    def _expand(self, q: str, y: np.ndarray) -> np.ndarray:
        """``Q_qᵀ y`` for answers ``y`` (n, n_answers) as a broadcastable (n, *shape) view-ish
        array: answers reshaped over the ``by`` factors, moved to attribute order, recoded axes
        expanded by their group map; summed-out axes stay of size 1."""
        spec = self.spec
        by = spec.query(q).by
        sizes, axes, maps = [], [], []
        for f in by:
            attr, m, labels = spec.factor_map(f)
            sizes.append(len(labels))
            axes.append(spec.axis(attr))
            maps.append(None if f == attr else m)
        t = y.reshape((y.shape[0],) + tuple(sizes))
        order = np.argsort(axes)
        t = t.transpose([0] + [1 + int(k) for k in order])
        for j, k in enumerate(order):
            mk = maps[int(k)]
            if mk is not None:
                t = np.take(t, mk, axis=1 + j)
        full = [1] * len(self.shape)
        for k in order:
            full[axes[int(k)]] = self.shape[axes[int(k)]]
        return t.reshape((y.shape[0],) + tuple(full))

    def _n_units(self, levels: Sequence[LevelMeasurements], i: int, n_below: int | None) -> int:
        lv = levels[i]
        if lv.summed and lv.child_ptr is not None:
            return int(np.asarray(lv.child_ptr)[-1])
        for vals, _ in lv.measured.values():
            return int(np.shape(vals)[0])
        if i + 1 < len(levels) and levels[i + 1].child_ptr is not None:
            return int(np.asarray(levels[i + 1].child_ptr).size - 1)
        if i + 1 == len(levels) and n_below is not None:
            return n_below
        raise PostprocessError(f"level {i}: no measurements and no child_ptr below it to size it")

    @staticmethod
    def _parents(ptr: np.ndarray | None, n_parent: int, n_child: int, where: str) -> np.ndarray:
        if ptr is None:
            raise PostprocessError(f"{where}: child_ptr is required below the top level")
        ptr = np.asarray(ptr, dtype=np.int64)
        if ptr.shape != (n_parent + 1,) or ptr[0] != 0 or ptr[-1] != n_child:
            raise PostprocessError(
                f"{where}: child_ptr must be ({n_parent + 1},) from 0 to {n_child}, got shape "
                f"{ptr.shape} ending at {ptr[-1] if ptr.size else None}")
        counts = np.diff(ptr)
        if np.any(counts < 1):
            raise PostprocessError(f"{where}: every parent needs at least one child "
                                   f"({int((counts < 1).sum())} have none)")
        return ptr

    def upward(self, levels: Sequence[LevelMeasurements], below: Message | None = None,
               below_child_ptr: np.ndarray | None = None, means: bool = True,
               leaf_means: bool = True) -> Upward:
        """Up pass over ``levels`` (top first). ``levels[k+1].child_ptr`` places level ``k+1``
        under level ``k``; ``levels[0].child_ptr`` is ignored. With ``below`` (stacked
        messages of subtrees, placed under ``levels[-1]`` by ``below_child_ptr``) the bottom of
        ``levels`` is an internal level; otherwise it is the leaf level and must identify x.

        Without ``means`` only the covariances are carried (no ``h``, no estimates): what the
        margins of error need, as the covariances never depend on the data; the covariances
        are bitwise those of a pass with means.

        Without ``leaf_means`` the leaf level's own estimates are not carried (its units get
        no posterior mean; every level above gets exactly the same estimates as with them):
        the leaves share one covariance ``J_L⁻¹``, so what their parents need, ``s_v = Σ_c z_c =
        J_L⁻¹ Σ_c h_c``, is made from each parent's *summed* leaf measurements, and the
        change of basis of every leaf's measurements — the bulk of a pass — is skipped."""
        if not levels:
            raise PostprocessError("GLS: no levels")
        if (below is None) != (below_child_ptr is None):
            raise PostprocessError("GLS: below and below_child_ptr go together")
        if below is not None and below.model is not self:
            raise PostprocessError("GLS: the message below was built by another GLSModel")
        L = len(levels)
        n_below = None if below is None else below.n_units
        sizes = [self._n_units(levels, i, None if below is None else
                               int(np.asarray(below_child_ptr).size - 1)) for i in range(L)]
        bounds: list[_Boundary] = []
        J: list[np.ndarray] = []
        h: list[np.ndarray] | None = [] if means else None
        if below is not None:
            J = list(below.info)
            h = list(below.h) if below.h is not None and means else None
        carry = h is not None  # means carried (not without means, nor above a means-less message)
        for i in range(L - 1, -1, -1):
            lv, n = levels[i], sizes[i]
            where = f"level {i}{f' ({lv.name})' if lv.name else ''}"
            leaf = i == L - 1 and below is None
            # a leaf level with a parent level in this call gets its b per parent below
            per_leaf = carry and (not leaf or leaf_means or L == 1)
            if lv.summed and (not leaf or per_leaf or L == 1):
                raise PostprocessError(f"{where}: summed measurements serve only as the leaf level under a parent "
                                       "level of an up pass without leaf means")
            A, b = self._level_terms(lv, i, n, per_leaf, summed=lv.summed)
            if leaf:
                self._check_identified(A, where)
                J = [a[None] for a in A]  # shared by every leaf
                h = (b if b is not None else []) if per_leaf else None
                continue
            n_child = n_below if i == L - 1 else sizes[i + 1]
            assert n_child is not None
            ptr = self._parents(below_child_ptr if i == L - 1 else levels[i + 1].child_ptr,
                                n, n_child, f"{where} -> children")
            h_sum = None
            if carry and i == L - 2 and below is None:
                _, h_sum = self._level_terms(levels[L - 1], L - 1, n_child, True, sum_by=ptr[:-1],
                                             summed=levels[L - 1].summed)
            bd = _Boundary.make(ptr, J, h, n_child, h_sum)
            bounds.append(bd)
            J = [a[None] + ci for a, ci in zip(A, bd.Cinv)]
            h = None if bd.s is None else [ci @ s for ci, s in zip(bd.Cinv, bd.s)]
            if b is not None and h is not None:
                h = [hk + bk for hk, bk in zip(h, b)]
        bounds.reverse()
        top = Message(self, tuple(np.broadcast_to(j, (sizes[0],) + j.shape[1:]).copy()
                                  for j in J), None if h is None else tuple(h))
        return Upward(self, top, tuple(bounds), tuple(sizes), below is not None)

    def _check_identified(self, A: Sequence[np.ndarray], where: str) -> None:
        for a, c in zip(A, self.components):
            ev = np.linalg.eigvalsh(a)
            if ev.size and not ev.min() > _ID_TOL * max(float(np.abs(ev).max()), 1e-300):
                raise PostprocessError(
                    f"{where}: the bottom level's queries do not identify every cell (the "
                    f"information matrix is singular on component {c.in_ind}); the bottom level "
                    "must measure an identity-like query set (e.g. the detailed query)")

    def downward(self, up: Upward, top: Posterior | None = None) -> GLSFit:
        """Down pass. ``top``: posterior of ``up``'s top units (from the fit above, e.g.
        ``fit_above.below.select(s, s + 1)``); ``None`` if they are roots."""
        if up.model is not self:
            raise PostprocessError("GLS: the up pass was run by another GLSModel")
        if top is None:
            P = [_sym(np.linalg.inv(j)) for j in up.message.info]
            h = up.message.h
            post = Posterior(self, None if h is None else tuple(p @ hh for p, hh in zip(P, h)), tuple(P))
        else:
            if top.model is not self or top.n_units != up.sizes[0]:
                raise PostprocessError(f"GLS: top posterior has {top.n_units} units from model "
                                       f"{id(top.model)}, need {up.sizes[0]} from {id(self)}")
            post = top
        fits = [LevelFit(self, post)]
        for bd in up.bounds:
            post = bd.down(self, post)
            fits.append(LevelFit(self, post))
        below = None
        if up.has_below:
            below = fits.pop().posterior
        return GLSFit(tuple(fits), below)


def _sym(M: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (M + np.swapaxes(M, -1, -2)))


def exact_sum(x: np.ndarray) -> np.ndarray:
    """The sum over the first axis of float64 ``x`` ``(n, *shape)`` (finite), exactly: an object
    array ``shape`` of :class:`fractions.Fraction`. Sums of parts add up (``+``) to exactly the
    sum of the whole, so a total made of them is the same however the units were grouped or
    ordered; :func:`exact_float` rounds it once.

    Each value is ``M·2^(e−53)`` with an integer ``|M| < 2^53`` (``frexp``); ``M`` split into
    ``hi·2^27 + lo`` (``|hi| < 2^26``, ``0 ≤ lo < 2^27``) is summed per entry and exponent with
    ``bincount``, whose float64 accumulation of such integers is exact below 2^53, i.e. for up to
    2^26 units; those few sums are scaled and added as Python integers."""
    from fractions import Fraction

    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise PostprocessError("exact_sum: values must be finite")
    n, shape = x.shape[0], x.shape[1:]
    if n >= 1 << 26:
        raise PostprocessError(f"exact_sum: {n} units, at most 2^26 at a time")
    flat = x.reshape(n, int(np.prod(shape, dtype=np.int64)))
    m, e = np.frexp(flat)
    M = np.ldexp(m, 53).astype(np.int64)
    hi = M >> 27
    lo = M - (hi << 27)
    e0 = int(e.min()) if e.size else 0
    span = int(e.max()) - e0 + 1 if e.size else 1
    key = np.arange(flat.shape[1], dtype=np.int64)[None, :] * span + (e - e0)
    uniq, inv = np.unique(key.ravel(), return_inverse=True)
    H = np.bincount(inv, weights=hi.ravel().astype(np.float64), minlength=uniq.size)
    L = np.bincount(inv, weights=lo.ravel().astype(np.float64), minlength=uniq.size)
    out = np.array([Fraction(0)] * flat.shape[1], dtype=object)
    for k, h, lw in zip(uniq.tolist(), H.tolist(), L.tolist()):
        col, shift = divmod(k, span)
        v = (int(h) << 27) + int(lw)
        if v:
            p = shift + e0 - 53
            out[col] += Fraction(v << p) if p >= 0 else Fraction(v, 1 << -p)
    return out.reshape(shape)


def exact_float(total: np.ndarray) -> np.ndarray:
    """float64 array of an :func:`exact_sum` (or a sum of them), each entry correctly rounded."""
    return np.array([float(v) for v in np.asarray(total, dtype=object).ravel()], dtype=np.float64).reshape(
        np.shape(total))


# --------------------------------------------------------------------------------------------
# messages and state


@dataclass(frozen=True)
class Message:
    """What a subtree tells the level above, per top unit and component: the information
    matrix ``info[k]`` (n, m', m') (1/persons²) and vector ``h[k]`` (n, m', r) (1/persons;
    ``None`` from an up pass without means)."""

    model: GLSModel = field(repr=False)
    info: tuple[np.ndarray, ...]
    h: tuple[np.ndarray, ...] | None

    @property
    def n_units(self) -> int:
        return int(self.info[0].shape[0]) if self.info else 0

    def subtree_fit(self) -> LevelFit:
        """The top units estimated from their own subtrees only: ``J⁻¹h`` with covariance ``J⁻¹``
        (what :meth:`Upward.subtree` gives for the levels below the top)."""
        cov = tuple(_sym(np.linalg.inv(j)) for j in self.info)
        mean = None if self.h is None else tuple(c @ h for c, h in zip(cov, self.h))
        return LevelFit(self.model, Posterior(self.model, mean, cov))


def stack_messages(messages: Sequence[Message]) -> Message:
    """Concatenate the top units of several subtrees (in order) into one message."""
    if not messages:
        raise PostprocessError("GLS: no messages to stack")
    model = messages[0].model
    if any(m.model is not model for m in messages):
        raise PostprocessError("GLS: messages from different GLSModels")
    k = len(model.components)
    hs = [m.h for m in messages]
    return Message(model, tuple(np.concatenate([m.info[j] for m in messages]) for j in range(k)),
                   None if any(h is None for h in hs) else
                   tuple(np.concatenate([h[j] for h in hs if h is not None]) for j in range(k)))


@dataclass(frozen=True)
class Posterior:
    """Per unit and component: ``mean[k]`` (n, m', r) in persons and covariance ``cov[k]``
    (n, m', m') in persons² (the covariance is ``cov[k] ⊗ I_r`` on the component); ``mean`` is
    ``None`` from a pass without means. ``shared``, when units share covariances (the leaves of
    one parent): ``(rows, covs)`` with ``cov[k] == covs[k][rows]`` exactly, so that products
    with the covariances are made once per distinct one (:meth:`LevelFit.covariances`)."""

    model: GLSModel = field(repr=False)
    mean: tuple[np.ndarray, ...] | None
    cov: tuple[np.ndarray, ...]
    shared: tuple[np.ndarray, tuple[np.ndarray, ...]] | None = field(default=None, repr=False)

    @property
    def n_units(self) -> int:
        return int(self.cov[0].shape[0]) if self.cov else 0

    def select(self, start: int, stop: int) -> Posterior:
        """Units ``start:stop`` (e.g. one state's, to start its subtree's down pass)."""
        return Posterior(self.model, None if self.mean is None else tuple(m[start:stop] for m in self.mean),
                         tuple(c[start:stop] for c in self.cov),
                         None if self.shared is None else (self.shared[0][start:stop], self.shared[1]))


@dataclass(frozen=True)
class _Boundary:
    """What the down pass needs between a parent level and its children (per component)."""

    parent: np.ndarray  # int64 (n_child,) parent index of each child
    cov: tuple[np.ndarray, ...]  # children's subtree covariance J_c^-1, (n_c or 1, m', m')
    z: tuple[np.ndarray, ...] | None  # children's subtree estimates (n_c, m', r); None without means
    Cinv: tuple[np.ndarray, ...]  # (Σ_c cov_c)^-1 per parent (n_v, m', m')
    s: tuple[np.ndarray, ...] | None  # Σ_c z_c per parent (n_v, m', r); None without means

    @staticmethod
    def make(ptr: np.ndarray, J: Sequence[np.ndarray], h: Sequence[np.ndarray] | None,
             n_child: int, h_sum: Sequence[np.ndarray] | None = None) -> _Boundary:
        """``h_sum``: the children's ``h`` summed per parent, when the children share one ``J``
        (the leaves): then ``s = J⁻¹ h_sum`` and ``z`` only if ``h`` is given too."""
        starts = ptr[:-1]
        parent = np.repeat(np.arange(starts.size), np.diff(ptr))
        cov, z, Cinv, s = [], [], [], []
        for k, j in enumerate(J):
            cv = _sym(np.linalg.inv(j))
            full = np.broadcast_to(cv, (n_child,) + cv.shape[1:])
            C = np.add.reduceat(full, starts, axis=0)
            cov.append(cv)
            Cinv.append(_sym(np.linalg.inv(C)))
            if h is not None:
                z.append(cv @ h[k])
            if h_sum is not None:
                s.append(cv @ h_sum[k])
            elif h is not None:
                s.append(np.add.reduceat(z[k], starts, axis=0))
        return _Boundary(parent, tuple(cov), None if h is None else tuple(z), tuple(Cinv),
                         None if h is None and h_sum is None else tuple(s))

    def down(self, model: GLSModel, post: Posterior) -> Posterior:
        means = self.z is not None and self.s is not None and post.mean is not None
        mean, cov, distinct = [], [], []
        for k, (cv, ci, Pv) in enumerate(zip(self.cov, self.Cinv, post.cov)):
            if cv.shape[0] == 1:
                # children sharing one subtree covariance (the leaves): every child of a parent
                # gets the same gain and posterior covariance, so both are made once per parent
                # (the same products, so bitwise what each child would get) and gathered
                K = cv @ ci  # (n_v, m', m')
                if means:
                    assert self.z is not None and self.s is not None and post.mean is not None
                    mean.append(self.z[k] + (K @ (post.mean[k] - self.s[k]))[self.parent])
                distinct.append(_sym(cv - K @ cv + K @ Pv @ np.swapaxes(K, -1, -2)))
                cov.append(distinct[-1][self.parent])
                continue
            K = cv @ ci[self.parent]  # (n_c, m', m')
            if means:
                assert self.z is not None and self.s is not None and post.mean is not None
                mean.append(self.z[k] + K @ (post.mean[k] - self.s[k])[self.parent])
            KT = np.swapaxes(K, -1, -2)
            cov.append(_sym(cv - K @ cv + K @ Pv[self.parent] @ KT))
        shared = (self.parent, tuple(distinct)) if len(distinct) == len(cov) and cov else None
        return Posterior(model, tuple(mean) if means else None, tuple(cov), shared)


@dataclass(frozen=True)
class Upward:
    """Result of an up pass: the top units' :attr:`message` and the state for the down pass."""

    model: GLSModel = field(repr=False)
    message: Message
    bounds: tuple[_Boundary, ...] = field(repr=False)
    sizes: tuple[int, ...]
    has_below: bool

    def above_bottom(self) -> Upward:
        """This leaf up pass without its boundary into the bottom level: :meth:`subtree` and
        :meth:`GLSModel.downward` as before for every level above the bottom, and no bottom
        posterior (the bottom's boundary holds the bottom units' subtree covariances and, with
        leaf means, a ``(units, m', r)`` array per component: the largest part of a pass to keep)."""
        if self.has_below or not self.bounds:
            raise PostprocessError("GLS: above_bottom needs a leaf up pass of at least two levels")
        return Upward(self.model, self.message, self.bounds[:-1], self.sizes[:-1], False)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array of this up pass by name (e.g. for ``np.savez``; :meth:`from_arrays`)."""
        out = {"sizes": np.asarray(self.sizes, np.int64), "has_below": np.asarray(self.has_below)}
        for j, a in enumerate(self.message.info):
            out[f"info.{j}"] = a
        for j, a in enumerate(self.message.h or ()):
            out[f"h.{j}"] = a
        for b, bd in enumerate(self.bounds):
            out[f"{b}.parent"] = bd.parent
            for name in ("cov", "z", "Cinv", "s"):
                for j, a in enumerate(getattr(bd, name) or ()):
                    out[f"{b}.{name}.{j}"] = a
        return out

    @staticmethod
    def from_arrays(model: GLSModel, arrays: Mapping[str, np.ndarray]) -> Upward:
        """The up pass :meth:`to_arrays` gave, for ``model`` (the one that ran it, or its equal)."""
        k = len(model.components)

        def group(prefix: str) -> tuple[np.ndarray, ...] | None:
            return tuple(arrays[f"{prefix}.{j}"] for j in range(k)) if f"{prefix}.0" in arrays else None

        sizes = tuple(int(x) for x in arrays["sizes"])
        has_below = bool(arrays["has_below"])
        bounds = []
        for b in range(len(sizes) - (0 if has_below else 1)):
            cov, Cinv = group(f"{b}.cov"), group(f"{b}.Cinv")
            assert cov is not None and Cinv is not None
            bounds.append(_Boundary(arrays[f"{b}.parent"], cov, group(f"{b}.z"), Cinv, group(f"{b}.s")))
        info = group("info")
        assert info is not None
        return Upward(model, Message(model, info, group("h")), tuple(bounds), sizes, has_below)

    def subtree(self, i: int) -> LevelFit:
        """Level ``i``'s units (``i ≥ 1``) estimated from their own subtrees' measurements only:
        ``z_u = J_u⁻¹ h_u`` with covariance ``J_u⁻¹`` (the up pass's message to the parent).

        This is what a constrained top-down step should be given when it already holds the
        parent's answer fixed: the data above a unit tells it nothing more once its parent is
        known, and the subtree estimates of siblings are independent, so a per-child objective
        with these targets is exact (up to how the engine represents ``J_u``)."""
        if not 1 <= i <= len(self.bounds):
            raise PostprocessError(f"GLS: subtree estimates exist for levels 1..{len(self.bounds)}, not {i}")
        bd = self.bounds[i - 1]
        n = bd.parent.size
        cov = tuple(np.broadcast_to(c, (n,) + c.shape[1:]) for c in bd.cov)
        return LevelFit(self.model, Posterior(self.model, bd.z, cov))


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class LevelFit:
    """The BLUE of one level's units with its exact covariance."""

    model: GLSModel = field(repr=False)
    posterior: Posterior = field(repr=False)

    @property
    def n_units(self) -> int:
        return self.posterior.n_units

    @cached_property
    def estimate(self) -> np.ndarray:
        """float64 ``(n_units, d)``: BLUE of every cell (persons), consistent, zeros exactly 0."""
        if self.posterior.mean is None:
            raise PostprocessError("GLS: this fit carried covariances only (an up pass without means)")
        return self.model.from_components(self.posterior.mean)

    def query(self, q: str) -> np.ndarray:
        """``(n_units, n_answers)`` estimates of query ``q``'s answers (persons)."""
        return self.model.spec.query(q).answer_columns(self._estimate_columns).T

    @cached_property
    def _estimate_columns(self) -> np.ndarray:
        """:attr:`estimate` transposed, ``(d, n_units)`` C-contiguous: every query's answers are
        one sparse product over it (made once per fit, not once per query)."""
        return np.ascontiguousarray(self.estimate.T)

    def covariances_of(self, lefts: Sequence[Sequence[np.ndarray]], rights: Sequence[Sequence[np.ndarray]]
                       ) -> np.ndarray:
        """``(n_units, k)`` exact covariances (persons²) of ``l_jᵀx`` and ``r_jᵀx`` for ``k`` pairs
        of Kronecker products ``l_j = ⊗_a lefts[j][a]``, ``r_j = ⊗_a rights[j][a]`` (``[a]``: float
        ``(n_a,)``, attributes in spec order; e.g. every line of a table against itself, or
        against the unit's total); see :meth:`GLSModel.pair_products`."""
        return self.covariances(self.model.pair_products(lefts, rights))

    def covariances(self, products: Sequence[np.ndarray]) -> np.ndarray:
        """``(n_units, k)`` covariances of ``k`` pairs given as :meth:`GLSModel.pair_products`
        (made once for every level of a fit): per component one matrix product of the units'
        covariance blocks ``(n_units, m'·m')`` with the pairs' ``(m'·m', k)``."""
        out, rows = self.distinct_covariances(products)
        return out if rows is None else out[rows]

    def distinct_covariances(self, products: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`covariances` as ``(values, rows)``: ``values[rows]`` is the ``(n_units, k)``
        result, made once per distinct covariance (the leaves of one parent share theirs:
        :attr:`Posterior.shared`); ``rows`` is int ``(n_units,)``, or ``None`` when every unit has
        its own row (``values`` is then the result). A caller that reads the rows a range of
        units at a time need not make the whole array (a block level's is hundreds of MB)."""
        k = products[0].shape[1] if len(products) else 0
        shared = self.posterior.shared
        covs = self.posterior.cov if shared is None else shared[1]
        n = int(covs[0].shape[0]) if covs else self.n_units
        out = np.zeros((n, k))
        for c, P, prod in zip(self.model.components, covs, products):
            if prod.any():  # a component every pair is 0 on adds nothing
                out += np.asarray(P).reshape(n, c.free.size ** 2) @ prod
        return out, None if shared is None else shared[0]

    def information_sum(self) -> list[np.ndarray]:
        """``Σ_u J_u`` over the level's units, per component (m', m'), exactly
        (:func:`exact_sum`: object arrays of fractions): the sums of several parts of a level
        (streaming) add up to the whole level's, whatever the cut, and :meth:`engine_weights`
        rounds them once. (A float sum's last bits depend on the grouping, and so did the
        engine's weights and, through them, a few published counts: ~6,000 of 127 M rows of a
        100 M-person release between parts of 100,000 and 40,000 blocks.)"""
        return [exact_sum(np.linalg.inv(P)) for P in self.posterior.cov]

    def engine_weights(self, queries: Sequence[str], information: Sequence[np.ndarray] | None = None,
                       units: int | None = None) -> dict[str, float]:
        """One weight per query (≥ 0, persons⁻²) for an engine whose objective per unit is
        ``Σ_q w_q ||Q_q x − Q_q x̂||²``: the weights whose normal matrix ``Σ_q w_q Q_qᵀQ_q`` is
        closest to the exact information ``J = cov⁻¹`` of these estimates (averaged over the
        level's units), in the relative sense ``||J^-½ (Σ_q w_q Q_qᵀQ_q − J) J^-½||_F``
        (non-negative least squares over the algebra's blocks, each counted with its
        multiplicity); ``information``/``units``: the sum of ``J`` over a whole level and its unit
        count, when this fit is only part of it. With the raw measurements of one level this recovers ``1/v_q`` exactly;
        for GLS estimates, whose information is not a per-query sum, it is the best such sum.
        """
        from scipy.optimize import nnls

        m = self.model
        cols: list[list[np.ndarray]] = [[] for _ in queries]
        target = []
        total = [exact_float(t) for t in (self.information_sum() if information is None else information)]
        n = self.n_units if units is None else units
        for c, Jsum in zip(m.components, total):
            if c.free.size == 0:
                continue
            Jbar = Jsum / n
            Li = np.linalg.inv(np.linalg.cholesky(_sym(Jbar)))
            sw = np.sqrt(float(c.r))
            target.append(sw * np.eye(c.free.size).ravel())
            for k, q in enumerate(queries):
                cols[k].append(sw * (Li @ m.block(q, c) @ Li.T).ravel())
        w, _ = nnls(np.stack([np.concatenate(col) for col in cols], axis=1), np.concatenate(target))
        return {q: float(x) for q, x in zip(queries, w)}


@dataclass(frozen=True)
class GLSFit:
    """``levels[i]``: the fit of level ``i`` of the call (top first). ``below``: posterior of
    the units of the stacked messages given to :meth:`GLSModel.upward`, if any."""

    levels: tuple[LevelFit, ...]
    below: Posterior | None = None


# --------------------------------------------------------------------------------------------
# a large tree in parts


def split_parts(child_ptrs: Sequence[np.ndarray | None], n_units: Sequence[int], parts: int,
                deepest: int | None = None, largest: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """Where to cut a tree into parts that are fitted one at a time (the estimate stage's work
    items, the full estimator's margins of error): the split level ``k`` and the unit ranges
    ``(lo, hi)`` of level ``k`` that make the parts, in order.

    ``k`` is the shallowest level below the root with at least ``parts`` units none of which
    holds more than ``largest`` bottom units (default: twice a part's share, ``1/parts`` of
    them) — so that one large county (a city of most of a state's blocks) cannot be one part
    doing most of the work while the other workers idle; level ``deepest`` (default: the bottom)
    if no level above it qualifies. Consecutive units are grouped until a part holds ``1/parts``
    of the bottom units (a unit larger than that is a part of its own).

    ``child_ptrs[i]``: int64 ``(n_units[i] + 1,)`` children of each unit of level ``i`` at level
    ``i + 1`` (``None`` at the bottom); ``n_units``: units per level, root first."""
    L = len(n_units)
    deepest = L - 1 if deepest is None else deepest
    # bottom-unit boundaries of every level's units, from the bottom up
    below: list[np.ndarray] = [np.arange(n_units[L - 1] + 1, dtype=np.int64)]
    for i in range(L - 2, -1, -1):
        ptr = child_ptrs[i]
        assert ptr is not None
        below.insert(0, below[0][np.asarray(ptr, np.int64)])
    goal = max(1, int(n_units[L - 1]) // parts)
    most = 2 * goal if largest is None else int(largest)
    k = next((i for i in range(1, deepest)
              if n_units[i] >= parts and int(np.diff(below[i]).max()) <= most), deepest)
    size = np.diff(below[k])
    ranges, lo, held = [], 0, 0
    for u in range(n_units[k]):
        held += int(size[u])
        if held >= goal or u + 1 == n_units[k]:
            ranges.append((lo, u + 1))
            lo, held = u + 1, 0
    return k, ranges
