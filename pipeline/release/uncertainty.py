"""Margins of error (90%) of published table lines, from the measurement design alone.

For one geographic unit at level ``L`` the strategy measures queries ``Q_q`` (0/1 matrices
``(n_answers_q, n_cells)``) with independent noise of exact variance ``v_q`` (the same for every
unit of the level). The weighted-least-squares estimate of the unit's histogram from those
measurements alone has covariance ``H⁻¹`` with

    H = Σ_q Q_qᵀ Q_q / v_q          (n_cells × n_cells),

so a table line ``a`` (a 0/1 vector over cells) has variance ``aᵀ H⁻¹ a`` and

    moe90 = 1.645 · sqrt(aᵀ H⁻¹ a)        (the 90% convention of the American Community Survey).

Exact knowledge enters as equality constraints ``C x = c``: structural zeros (cells that are 0
by definition) and invariants (the total population at nation and state level, housing units
at every level when the block counts are invariant). The constrained estimate has covariance
``Σ − Σ Cᵀ (C Σ Cᵀ)⁻ C Σ`` (Σ = H⁻¹), so an invariant line gets a margin of error of exactly 0.

What the number is, honestly: it is the margin of error of the *unconstrained* (apart from the
equalities above) linear estimate from the level's own noisy measurements. It depends only on
the strategy, never on the data, so publishing it costs no privacy. The published counts are
further post-processed (non-negativity, consistency with the parent, integer rounding), which
can reduce variance but adds a data-dependent bias, largest for small counts; the margin of
error does not include that bias.

Levels where some cell combinations are not measured: if the measured queries do not
determine a line (``a`` is not in the row space of the stacked ``Q_q``; e.g. a level that
measures only ``total``, asked for P1 line 3), the line has no unbiased estimate from that
level's measurements: its margin of error is NaN (published as null), and the release's
``index.html`` says so. Otherwise ``H`` is inverted on its range (pseudo-inverse), which is
exact for every estimable line.

Computation: cells that no measured query tells apart are merged first (so a level without
``detailed`` works on a small matrix); with ``detailed`` measured, ``H`` is a scaled identity
plus a low-rank sum and ``H⁻¹`` is applied by the Woodbury identity (a ~600 × 600 Cholesky for
the 2020 strategy instead of 1,953 × 1,953). Everything is per level, never per unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.linalg as la
from threadpoolctl import threadpool_limits

from pipeline.errors import DptabError
from pipeline.model.design import normal_matrix
from pipeline.model.spec import HistogramSpec
from pipeline.release.tables import TableDef

#: two-sided 90% normal quantile, rounded as in the ACS
Z90 = 1.645


class UncertaintyError(DptabError, ValueError):
    """A variance is missing, non-positive or refers to an unknown query."""


class DiskRows:
    """A float64 ``(n_units, k)`` array kept in a file of its own (raw, C order) and read a range
    of units at a time: ``m[s:e]`` (rows only). The release writer's margins of every unit above
    the bottom level (~1.4 GB on the US geography) are written once and read back as each chunk
    of units is published, instead of being held for the whole of publishing."""

    ndim = 2

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.path, self._shape = Path(path), (int(shape[0]), int(shape[1]))

    @classmethod
    def write(cls, path: Path, a: np.ndarray) -> "DiskRows":
        """Write float ``(n, k)`` ``a`` to ``path`` and return it as kept there."""
        a = np.ascontiguousarray(a, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"DiskRows holds 2-d arrays, not shape {a.shape}")
        a.tofile(path)
        return cls(path, a.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"DiskRows reads ranges of rows (m[s:e]), not {key!r}")
        n, k = self._shape
        s, e, _ = key.indices(n)
        e = max(e, s)
        return np.fromfile(self.path, np.float64, count=(e - s) * k, offset=s * k * 8).reshape(e - s, k)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class RepeatedRows:
    """A float ``(n_units, k)`` array held as its distinct rows and each unit's row among them:
    ``values[rows]``. The full estimator's margins of the bottom level are per parent (the
    leaves of one parent share their covariance), so the block level's — hundreds of MB, made
    and written fresh on every release — are kept as the parents' and made a range of units at
    a time by whoever reads them (``m[s:e]``, ``m[:, j]``: any numpy index, rows first; with
    ``values`` a :class:`DiskRows`, ranges of units ``m[s:e]`` only, which read the rows of
    their parents alone)."""

    ndim = 2

    def __init__(self, values: "np.ndarray | DiskRows", rows: np.ndarray) -> None:
        self.values, self.rows = values, rows

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.shape[0]), int(self.values.shape[1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(self.values, DiskRows):
            if not isinstance(key, slice):
                raise TypeError(f"margins kept in a file are read by ranges of units (m[s:e]), not {key!r}")
            r = self.rows[key]
            lo = int(r.min()) if r.size else 0
            hi = int(r.max()) + 1 if r.size else 0
            return self.values[lo:hi][r - lo]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        return self.values[(slice(None), *rest)][self.rows[first]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.values)[self.rows]
        return out if dtype is None else out.astype(dtype)


def _atoms(spec: HistogramSpec, queries: Sequence[str], keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group the kept cells into atoms: cells that no measured query tells apart.

    Returns ``(atom, first)``: the atom of each kept cell ``(n_kept,)`` and one representative
    kept-cell index per atom ``(n_atoms,)``. Every query is constant on an atom, so the
    information matrix lives on atoms and is small when ``detailed`` is not measured.
    """
    keys = np.stack([spec.query(q).cell_to_answer[keep] for q in queries], axis=1)
    _, first, atom = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return atom.reshape(-1), first


def information_matrix(spec: HistogramSpec, variances: Mapping[str, float],
                       cells: np.ndarray | None = None) -> np.ndarray:
    """``H = Σ_q Q_qᵀ Q_q / v_q`` restricted to ``cells`` (default all): float64 ``(n, n)``.

    Each query is a partition of cells, so ``Q_qᵀ Q_q`` is 1 exactly where two cells share an
    answer: ``H[i, j] = Σ_q [c2a_q(i) == c2a_q(j)] / v_q``.
    """
    idx = np.arange(spec.n_cells) if cells is None else np.asarray(cells)
    for name, v in variances.items():
        if not np.isfinite(float(v)) or float(v) <= 0:
            raise UncertaintyError(f"variance of query {name!r} must be finite and > 0, got {v}")
    if not variances:
        return np.zeros((idx.size, idx.size), dtype=np.float64)
    return normal_matrix({name: spec.query(name).cell_to_answer[idx] for name in variances},
                         {name: 1.0 / float(v) for name, v in variances.items()})


def _solve_with_detailed(spec: HistogramSpec, variances: Mapping[str, float], cells: np.ndarray,
                         rhs: np.ndarray) -> np.ndarray:
    """``H⁻¹ rhs`` when the identity query (one answer per cell) is measured, by the Woodbury identity.

    ``H = I/v_d + U diag(1/v) Uᵀ`` where ``U`` stacks the 0/1 answer columns of the other
    queries (a few hundred for the 2020 strategy), so only a small ``(r, r)`` system is
    factorised instead of the ``(n_cells, n_cells)`` one:
    ``H⁻¹ = v_d I − v_d² U (diag(v) + v_d UᵀU)⁻¹ Uᵀ``.
    """
    ident = spec.role("identity")
    vd = float(variances[ident])
    cols, wv = [], []
    for name, v in variances.items():
        v = float(v)
        if not np.isfinite(v) or v <= 0:
            raise UncertaintyError(f"variance of query {name!r} must be finite and > 0, got {v}")
        if name == ident:
            continue
        q = spec.query(name)
        u = np.zeros((cells.size, q.n_answers))
        u[np.arange(cells.size), q.cell_to_answer[cells]] = 1.0
        cols.append(u)
        wv.append(np.full(q.n_answers, v))
    if not cols:
        return vd * rhs
    u = np.hstack(cols)
    m = np.diag(np.concatenate(wv)) + vd * (u.T @ u)
    inner = la.cho_solve(la.cho_factor(m), u.T @ rhs)
    return vd * rhs - vd * vd * (u @ inner)


def line_covariance(spec: HistogramSpec, variances: Mapping[str, float], lines: np.ndarray,
                    exact: Sequence[np.ndarray] = (), rtol: float = 1e-9) -> np.ndarray:
    """Variances ``aᵀ Σ_c a`` of linear functionals ``lines`` (float ``(n_lines, n_cells)``).

    ``exact``: vectors ``(n_cells,)`` whose value is known exactly (invariants); structural
    zeros of ``spec`` are always exact. Returns float64 ``(n_lines,)``; NaN where a line is not
    estimable from the measured queries.
    """
    a = np.asarray(lines, dtype=np.float64)
    n_lines = a.shape[0]
    c_all = np.asarray(exact, dtype=np.float64).reshape(-1, spec.n_cells)
    if not variances:
        # nothing measured: only lines spanned by the exact vectors are known (variance 0)
        out = np.full(n_lines, np.nan)
        if c_all.shape[0]:
            coef, *_ = np.linalg.lstsq(c_all.T, a.T, rcond=None)
            resid = np.linalg.norm(c_all.T @ coef - a.T, axis=0)
            out[resid <= 1e-9 * np.maximum(1, np.linalg.norm(a, axis=1))] = 0.0
        return out
    keep = ~spec.structural_zero_mask  # structural zeros are known: drop their cells
    atom, first = _atoms(spec, list(variances), keep)
    ak, ck = a[:, keep], c_all[:, keep]
    # a line that splits an atom is not a function of the measured answers: not estimable
    a_at, c_at = ak[:, first], ck[:, first]
    estimable = np.all(ak == a_at[:, atom], axis=1)
    c_at = c_at[np.all(ck == c_at[:, atom], axis=1)]  # exact vectors usable on atoms
    cells = np.nonzero(keep)[0][first]
    rhs = np.vstack([a_at, c_at]).T                    # (n_atoms, n_lines + k)
    if spec.has_role("identity") and spec.role("identity") in variances:
        # every cell is its own atom and measured: H is positive definite
        sol = _solve_with_detailed(spec, variances, cells, rhs)
    else:
        h = information_matrix(spec, variances, cells)
        w, v = np.linalg.eigh(h)
        pos = w > rtol * w.max()
        vp = v[:, pos]
        proj = vp.T @ rhs
        sol = vp @ (proj / w[pos][:, None])            # pseudo-inverse applied to rhs
        # a line is estimable iff it lies in the range of H
        outside = np.linalg.norm(rhs - vp @ proj, axis=0)
        inside = outside <= 1e-8 * np.maximum(1.0, np.linalg.norm(rhs, axis=0))
        estimable &= inside[:n_lines]
        keep_c = inside[n_lines:]
        sol = np.hstack([sol[:, :n_lines], sol[:, n_lines:][:, keep_c]])
        rhs = np.hstack([rhs[:, :n_lines], rhs[:, n_lines:][:, keep_c]])
    sa = sol[:, :n_lines]                              # Σ a
    var = np.einsum("ij,ij->j", rhs[:, :n_lines], sa)
    if sol.shape[1] > n_lines:
        sc = sol[:, n_lines:]                          # Σ C
        m = rhs[:, n_lines:].T @ sc                    # Cᵀ Σ C
        t = rhs[:, :n_lines].T @ sc                    # aᵀ Σ C   (n_lines, k)
        var = var - np.einsum("ij,ij->i", t @ np.linalg.pinv(m, rcond=1e-12), t)
    base = np.einsum("ij,ij->j", rhs[:, :n_lines], sa)
    var = np.where(var <= 1e-9 * np.maximum(base, 1e-300), 0.0, var)  # invariant lines: exactly 0
    var[~estimable] = np.nan
    return var


def table_moe90(spec: HistogramSpec, variances: Mapping[str, float], tables: Sequence[TableDef],
                exact: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """90% margins of error per line of each table at one level: ``{table: float (n_lines,)}``.

    ``variances``: exact noise variance per measured query at this level (counts²);
    ``exact``: cell vectors known exactly at this level (see :func:`line_covariance`).
    """
    if not tables:
        return {}
    stacked = np.vstack([t.matrix.toarray() for t in tables]).astype(np.float64)
    var = line_covariance(spec, variances, stacked, exact)
    out, k = {}, 0
    for t in tables:
        out[t.name] = Z90 * np.sqrt(var[k:k + t.n_lines])
        k += t.n_lines
    return out


def release_moe90(tables_by_kind: Mapping[str, Sequence[TableDef]], specs: Mapping[str, HistogramSpec],
                  variances: Mapping[str, Mapping[str, Mapping[str, float]]],
                  levels: Sequence[str], exact_totals: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], np.ndarray]:
    """Margins of error for every (table, level): ``{(table, level): float (n_lines,)}``.

    ``variances[kind][level][query]``: the exact noise variance of each measured query
    (``kind`` is ``persons`` or ``units``); a level absent from it measured nothing.
    ``exact_totals[kind]``: the levels where that histogram's total is invariant (e.g.
    persons: nation and state; units: every level when block housing units are invariant).
    """
    out: dict[tuple[str, str], np.ndarray] = {}
    with threadpool_limits(1, "blas"):  # small dense systems: BLAS threads only contend
        _release_moe90(tables_by_kind, specs, variances, levels, exact_totals, out)
    return out


def _release_moe90(tables_by_kind, specs, variances, levels, exact_totals, out) -> None:
    for kind, tabs in tables_by_kind.items():
        if not tabs or kind not in variances:
            continue
        spec = specs[kind]
        for level in levels:
            exact = [np.ones(spec.n_cells)] if level in exact_totals.get(kind, ()) else []
            moe = table_moe90(spec, variances[kind].get(level, {}), tabs, exact)
            for name, m in moe.items():
                out[(name, level)] = m


# --------------------------------------------------------------------------------------
# the full estimator (``postprocess.estimator: full``): per-unit margins from the GLS


def line_factors(spec: HistogramSpec, mask: np.ndarray) -> list[np.ndarray]:
    """The per-attribute 0/1 vectors whose Kronecker product is the cell mask of one table line.

    ``mask``: bool ``(n_cells,)``; returns one float ``(n_a,)`` per attribute of ``spec``. Every
    line of a table file is a ``where`` filter (one code set per attribute, intersected), so it
    factors; anything else raises :class:`UncertaintyError`.
    """
    cube = np.asarray(mask, dtype=bool).reshape(spec.shape)
    axes = range(cube.ndim)
    factors = [cube.any(axis=tuple(b for b in axes if b != a)) for a in axes]
    prod = factors[0]
    for f in factors[1:]:
        prod = np.multiply.outer(prod, f)
    if not np.array_equal(prod, cube):
        raise UncertaintyError("a table line is not a product of one code set per attribute")
    return [f.astype(np.float64) for f in factors]


#: the full estimator's margins are fitted a part of the tree at a time, each about this many
#: bottom units (blocks): the fit of a whole national tree at once held ~12 GB
MARGIN_PART_UNITS = 100_000


def gls_line_variances(tables_by_kind: Mapping[str, Sequence[TableDef]], specs: Mapping[str, HistogramSpec],
                       variances: Mapping[str, Mapping[str, Mapping[str, float]]], child_ptrs: Sequence[np.ndarray],
                       levels: Sequence[str], exact_totals: Mapping[str, Sequence[str]],
                       part_units: int | None = None) -> dict[tuple[str, str], np.ndarray | RepeatedRows]:
    """Exact variances (counts²) of the full estimator's line estimates, per unit:
    ``{(table, level): float (n_units, n_lines)}`` (:class:`RepeatedRows` where units share them:
    the bottom level's, per parent).

    ``child_ptrs[i]``: CSR int64 ``(n_i + 1,)`` of level ``i + 1``'s units under level ``i``
    (the geography's ``child_ptr``); ``variances`` and ``exact_totals`` as in
    :func:`release_moe90`. The GLS covariance depends only on the design (which queries, which
    variances), the shape of the tree and the structural zeros — never on the data — so these
    margins cost no privacy and ``dptab verify`` recomputes them from the manifest.

    Invariant totals (persons at nation and state, housing units everywhere they are declared)
    are exact: a line's variance is then the GLS variance conditioned on the unit's total,
    ``var(l) − cov(l, t)² / var(t)``, so the total itself gets 0. (The GLS itself does not use
    the invariants; the engine imposes them afterwards, which this per-unit conditioning
    describes for the unit itself, not for its relatives: an approximation, stated in the
    release notes.)

    Memory: the tree is fitted in parts of about ``part_units`` (default
    :data:`MARGIN_PART_UNITS`; ``0``: the whole tree at once, as releases made before the parts
    were, which ``dptab verify`` then reproduces bitwise) bottom units (subtrees of
    consecutive units of a split level, :func:`~pipeline.postprocess.gls.split_parts`, no
    deeper than the bottom's parents): each part's up pass gives its message to the levels
    above, those are fitted, and each part's up pass is run again for its down pass — so only
    one part's fit is held at a time, beside the results. The covariances are those of the whole
    tree fitted at once to rounding (BLAS orders a matrix product's sums by how many rows it is
    given); the parts follow from the tree alone, so the writer and ``dptab verify`` make the same
    bits.
    """
    from pipeline.postprocess.gls import GLSModel, LevelFit, LevelMeasurements, split_parts, stack_messages

    per_part = MARGIN_PART_UNITS if part_units is None else int(part_units)
    if per_part < 0:
        raise UncertaintyError(f"margins of error: part_units must be >= 0 (0: the whole tree), got {per_part}")
    L = len(levels)
    sizes = [1] + [int(p[-1]) for p in child_ptrs]
    ptrs = [np.asarray(p, dtype=np.int64) for p in child_ptrs]
    out: dict[tuple[str, str], np.ndarray | RepeatedRows] = {}
    for kind, tabs in tables_by_kind.items():
        if not tabs or kind not in variances:
            continue
        spec, var = specs[kind], variances[kind]

        def subtree(i0: int, lo: int, hi: int, stop: int) -> list[LevelMeasurements]:
            """Levels ``i0..stop-1`` under units ``lo:hi`` of level ``i0`` (pointers rebased), with
            no data: zero values of the queries' exact variances."""
            sub, ptr = [], None
            for i in range(i0, stop):
                sub.append(LevelMeasurements(ptr, {q: (np.broadcast_to(0.0, (hi - lo, spec.query(q).n_answers)), float(v))
                                                   for q, v in var.get(levels[i], {}).items()}))
                if i + 1 < stop:
                    ptr = ptrs[i][lo:hi + 1] - ptrs[i][lo]
                    lo, hi = int(ptrs[i][lo]), int(ptrs[i][hi])
            return sub

        model = GLSModel(spec, (q for lv in levels for q in var.get(lv, {})))
        ones = [np.ones(n, np.float64) for n in spec.shape]
        total = model.pair_products([ones], [ones])
        lines = {t.name: [line_factors(spec, row) for row in t.matrix.toarray() > 0] for t in tabs}
        # every line's pair products once for all levels (they depend on the model alone)
        own = {name: model.pair_products(ls, ls) for name, ls in lines.items() if ls}
        with_total = {name: model.pair_products(ls, [ones] * len(ls)) for name, ls in lines.items() if ls}
        for i, level in enumerate(levels[:-1]):
            for t in tabs:
                out[(t.name, level)] = np.empty((sizes[i], len(lines[t.name])))
        # the leaves' variances per parent, each table's in parts, and the leaves' rows among
        # them (one array for every table: at a national block level, 66 MB each)
        bottom: dict[str, list[np.ndarray]] = {t.name: [] for t in tabs}
        bottom_rows: list[np.ndarray] = []
        rows_from = next((t.name for t in tabs if t.name in own), None)  # the table that records them

        def take(i: int, first: int, est: LevelFit) -> None:
            """Level ``i``'s line variances of the fit's units, the first being unit ``first``."""
            level = levels[i]
            # per distinct covariance (``rows``: the units' rows, the same for every product)
            var_t = est.distinct_covariances(total)[0] if level in exact_totals.get(kind, ()) else None
            for t in tabs:
                if t.name not in own:
                    continue
                v, rows = est.distinct_covariances(own[t.name])  # (n_distinct, n_lines)
                if var_t is not None:
                    c = est.distinct_covariances(with_total[t.name])[0]
                    v = v - np.divide(c * c, var_t, out=np.zeros_like(v), where=var_t > 0)
                v = np.maximum(v, 0.0)
                if i < L - 1:
                    dest = out[(t.name, level)]
                    assert isinstance(dest, np.ndarray)
                    dest[first:first + est.n_units] = v if rows is None else v[rows]
                else:  # the leaves: per parent, the parents' rows numbered across the parts
                    if t.name == rows_from:
                        held = sum(a.shape[0] for a in bottom[t.name])  # distinct rows of the parts before
                        bottom_rows.append(held + (np.arange(est.n_units) if rows is None else rows))
                    bottom[t.name].append(v)

        if L < 3 or per_part == 0:  # the whole tree at once (nothing to cut, or as asked)
            for i, est in enumerate(model.downward(model.upward(subtree(0, 0, 1, L), means=False)).levels):
                take(i, 0, est)
        else:
            k, ranges = split_parts([*ptrs, None], sizes, max(1, -(-sizes[-1] // per_part)), deepest=L - 2)
            below = stack_messages([model.upward(subtree(k, lo, hi, L), means=False).message for lo, hi in ranges])
            top = model.downward(model.upward(subtree(0, 0, 1, k), below=below, below_child_ptr=ptrs[k - 1],
                                              means=False))
            del below
            assert top.below is not None
            for i in range(k):
                take(i, 0, top.levels[i])
            for lo, hi in ranges:
                part = model.downward(model.upward(subtree(k, lo, hi, L), means=False), top.below.select(lo, hi))
                first = lo
                for i, est in enumerate(part.levels, start=k):
                    take(i, first, est)
                    if i + 1 < L:
                        first = int(ptrs[i][first])
        rows_all = np.concatenate(bottom_rows) if bottom_rows else None
        for t in tabs:
            values = bottom[t.name]
            if t.name not in own:
                out[(t.name, levels[-1])] = np.zeros((sizes[-1], 0))
            elif len(values) == 1 and np.array_equal(rows_all, np.arange(sizes[-1])):
                out[(t.name, levels[-1])] = values[0]
            else:
                assert rows_all is not None
                out[(t.name, levels[-1])] = RepeatedRows(np.concatenate(values), rows_all)
    return out


# --------------------------------------------------------------------------------------
# simulated margins (``output.margins: simulated``; ``pipeline.job.margins``)

#: size bins of a published count for the simulated margins: labels and lower edges
SIZE_BIN_LABELS = ("0", "1-9", "10-49", "50-249", "250-999", ">=1000")
_SIZE_EDGES = np.array([1, 10, 50, 250, 1000])


def size_bin(counts: np.ndarray) -> np.ndarray:
    """Index into :data:`SIZE_BIN_LABELS` of each count (int64, same shape)."""
    return np.searchsorted(_SIZE_EDGES, np.asarray(counts), side="right").astype(np.int64)


def simulated_moe90(lookup: Any, moving: Any, table: TableDef, level: str, counts: np.ndarray,
                    units: np.ndarray | None = None) -> np.ndarray:
    """Per-cell simulated margins of one table at one level: float ``(n_units, n_lines)``.

    ``lookup``: rows (table, geolevel, line, size_bin, moe90); ``moving``: rows (table, geolevel,
    unit, line) of the cells some rerun changed, or ``None`` (then every cell takes its group's
    value: the upper bound ``dptab verify`` checks against); ``counts``: the published int
    ``(n_units, n_lines)``; ``units``: their unit indices in the level (default ``0..n-1``).
    A cell gets its (line, size bin of its count) group's value if it moved, else 0.
    """
    import polars as pl

    n, n_lines = counts.shape
    lk = lookup.filter((pl.col("table") == table.name) & (pl.col("geolevel") == level))
    grid = np.zeros((n_lines, len(SIZE_BIN_LABELS)))
    line_at = {int(x): i for i, x in enumerate(table.numbers)}
    for r in lk.iter_rows(named=True):
        grid[line_at[int(r["line"])], SIZE_BIN_LABELS.index(r["size_bin"])] = float(r["moe90"])
    out = grid[np.arange(n_lines)[None, :], size_bin(counts)]
    if moving is not None:
        mv = moving.filter((pl.col("table") == table.name) & (pl.col("geolevel") == level))
        mask = np.zeros((n, n_lines), bool)
        idx = np.arange(n) if units is None else np.asarray(units)
        pos = np.searchsorted(idx, mv["unit"].to_numpy())
        ok = (pos < n) & (idx[np.minimum(pos, n - 1)] == mv["unit"].to_numpy())
        lines = np.array([line_at[int(x)] for x in mv["line"].to_list()], dtype=np.int64)
        mask[pos[ok], lines[ok]] = True
        out = np.where(mask, out, 0.0)
    return out
