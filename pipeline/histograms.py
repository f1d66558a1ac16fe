"""Microdata -> sparse histograms of every geographic level, and unit counts (public invariants).

Persons are read once: a single polars ``group_by(geoid, cell)`` gives the block histogram
(the cell index is computed in polars from the spec's attribute codes). Every upper level is
the sum of its children's histograms, computed from the level below with array operations —
the microdata is never scanned twice. Histograms are sparse: ``(unit, cell, count)`` int64
arrays sorted by ``(unit, cell)`` with positive counts only, since most block cells are zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.geography import Geography, GeographyError, LevelIndex, geoid_codes
from pipeline.spec import HistogramSpec

N_GQ_TYPES = 7  # GQ facility kinds 1..7 (the hhgq codes of the pl94 spec)
DENSE_SUM_LIMIT = 4_000_000  # parents x cells up to which aggregate_up sums densely (32 MB)


class HistogramError(ValueError):
    """Input to a histogram build is inconsistent (codes out of domain, unknown blocks, bad file)."""

    exit_status = 2


@dataclass(frozen=True, eq=False)
class SparseHistogram:
    """A histogram of ``n_units`` units × ``n_cells`` cells of one ``level``, stored sparsely.

    ``unit``, ``cell``, ``count``: int64 arrays of equal length ``nnz``, sorted by
    ``(unit, cell)`` without repeats, ``0 <= unit < n_units``, ``0 <= cell < n_cells``,
    ``count > 0``. Construction checks all of this (O(nnz)).
    """

    level: str
    n_units: int
    n_cells: int
    unit: np.ndarray = field(repr=False)
    cell: np.ndarray = field(repr=False)
    count: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("unit", "cell", "count"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.int64))
        object.__setattr__(self, "n_units", int(self.n_units))
        object.__setattr__(self, "n_cells", int(self.n_cells))
        u, c, k = self.unit, self.cell, self.count
        if not (u.ndim == c.ndim == k.ndim == 1 and u.size == c.size == k.size):
            raise HistogramError(f"{self.level}: unit/cell/count must be 1-D of equal length, got "
                                 f"{u.shape}, {c.shape}, {k.shape}")
        if u.size == 0:
            return
        if u[0] < 0 or u[-1] >= self.n_units or c.min() < 0 or c.max() >= self.n_cells:
            raise HistogramError(f"{self.level}: unit or cell index out of range "
                                 f"(n_units={self.n_units}, n_cells={self.n_cells})")
        if k.min() <= 0:
            raise HistogramError(f"{self.level}: {int((k <= 0).sum())} non-positive counts stored")
        du = np.diff(u)
        if (du < 0).any() or ((du == 0) & (np.diff(c) <= 0)).any():
            raise HistogramError(f"{self.level}: entries not sorted by (unit, cell) without repeats")

    @classmethod
    def _trusted(cls, level: str, n_units: int, n_cells: int, unit: np.ndarray, cell: np.ndarray,
                 count: np.ndarray) -> "SparseHistogram":
        """Construct without the O(nnz) checks, for arrays this module built sorted and positive
        (the property tests re-check them through the public constructor)."""
        h = object.__new__(cls)
        for name, value in (("level", level), ("n_units", int(n_units)), ("n_cells", int(n_cells)),
                            ("unit", unit), ("cell", cell), ("count", count)):
            object.__setattr__(h, name, value)
        return h

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) cells."""
        return int(self.count.size)

    def total(self) -> int:
        """Sum of all counts."""
        return int(self.count.sum())

    def totals(self) -> np.ndarray:
        """int64 ``(n_units,)``: the total count of each unit."""
        out = np.zeros(self.n_units, dtype=np.int64)
        if self.nnz:
            starts = np.flatnonzero(np.r_[True, self.unit[1:] != self.unit[:-1]])
            out[self.unit[starts]] = np.add.reduceat(self.count, starts)
        return out

    def unit_ptr(self) -> np.ndarray:
        """int64 ``(n_units + 1,)``: entries of unit ``i`` are ``unit_ptr[i]:unit_ptr[i+1]``."""
        return np.searchsorted(self.unit, np.arange(self.n_units + 1), side="left").astype(np.int64)

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int64 ``(stop - start, n_cells)``: dense rows of units ``start:stop``."""
        stop = self.n_units if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= self.n_units:
            raise HistogramError(f"{self.level}: bad unit range {start}:{stop} of {self.n_units}")
        lo, hi = np.searchsorted(self.unit, [start, stop], side="left")
        out = np.zeros((stop - start, self.n_cells), dtype=np.int64)
        out[self.unit[lo:hi] - start, self.cell[lo:hi]] = self.count[lo:hi]
        return out

    @classmethod
    def from_dense(cls, level: str, x: np.ndarray) -> "SparseHistogram":
        """The sparse form of a dense non-negative integer array ``(n_units, n_cells)``."""
        x = np.asarray(x)
        if x.ndim != 2 or (x < 0).any():
            raise HistogramError(f"{level}: dense histogram must be 2-D and non-negative")
        unit, cell = np.nonzero(x)
        return cls(level, x.shape[0], x.shape[1], unit, cell, x[unit, cell])

    def equals(self, other: "SparseHistogram") -> bool:
        """Same level, shape and entries."""
        return (self.level == other.level and self.n_units == other.n_units
                and self.n_cells == other.n_cells and np.array_equal(self.unit, other.unit)
                and np.array_equal(self.cell, other.cell) and np.array_equal(self.count, other.count))

    def to_parquet(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): columns unit, cell, count (int64); the level,
        n_units and n_cells go into the Parquet key-value metadata."""
        path = Path(path)
        table = pa.table({"unit": self.unit, "cell": self.cell, "count": self.count})
        meta = {b"dptab.level": self.level.encode(), b"dptab.n_units": str(self.n_units).encode(),
                b"dptab.n_cells": str(self.n_cells).encode()}
        table = table.replace_schema_metadata(meta)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            # row groups of 1 Mi entries: a shard's unit range reads only the groups it needs
            pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def from_parquet(cls, path: str | Path, units: tuple[int, int] | None = None) -> "SparseHistogram":
        """Read a file written by :meth:`to_parquet` (HistogramError naming the file if it is not one).

        ``units=(start, stop)`` reads only the entries of units ``start:stop`` (unit indices stay
        global, ``n_units`` unchanged), skipping row groups outside the range.
        """
        path = Path(path)
        filters = None if units is None else [("unit", ">=", int(units[0])), ("unit", "<", int(units[1]))]
        try:
            table = pq.read_table(path, filters=filters)
        except (OSError, pa.ArrowException) as exc:
            raise HistogramError(f"{path}: not a readable Parquet histogram ({exc})") from exc
        meta = table.schema.metadata or {}
        try:
            level = meta[b"dptab.level"].decode()
            n_units = int(meta[b"dptab.n_units"])
            n_cells = int(meta[b"dptab.n_cells"])
            cols = [table.column(c).to_numpy() for c in ("unit", "cell", "count")]
        except (KeyError, ValueError) as exc:
            raise HistogramError(f"{path}: missing histogram column or metadata ({exc})") from exc
        try:
            return cls(level, n_units, n_cells, *cols)
        except HistogramError as exc:
            raise HistogramError(f"{path}: {exc}") from exc


def cell_expr(spec: HistogramSpec) -> pl.Expr:
    """Polars expression for the cell index of each record (Int16 or wider), null if any code
    is out of the spec's domain. Row-major over ``spec.attributes`` (``ravel_multi_index``)."""
    cell: pl.Expr | None = None
    valid: pl.Expr | None = None
    for attr in spec.attributes:
        col = pl.col(attr.name).cast(pl.Int64)
        lo = attr.codes[0]
        if attr.codes == tuple(range(lo, lo + attr.size)):
            pos = col - lo
            ok = col.is_between(lo, lo + attr.size - 1)
        else:
            pos = col.replace_strict(list(attr.codes), list(range(attr.size)), default=None, return_dtype=pl.Int64)
            ok = pos.is_not_null()
        cell = pos if cell is None else cell * attr.size + pos
        valid = ok if valid is None else valid & ok
    assert cell is not None and valid is not None
    # a narrow key makes the group_by hash smaller and faster (2,016 cells fit in Int16)
    dtype = pl.Int16 if spec.n_cells <= 2**15 else pl.Int32 if spec.n_cells <= 2**31 else pl.Int64
    return pl.when(valid).then(cell).otherwise(None).cast(dtype).alias("cell")


def _block_index(geoids: pl.Series, blocks: LevelIndex, what: str) -> np.ndarray:
    """int64 block index of each GEOID; HistogramError if malformed or not in the geography."""
    try:
        return blocks.index_of_codes(geoid_codes(geoids, blocks.digits, what=f"{what} geoid values"))
    except GeographyError as exc:
        raise HistogramError(f"{what}: {exc}") from exc


def build_block_histogram(persons: pl.LazyFrame | pl.DataFrame, geography: Geography,
                          spec: HistogramSpec) -> SparseHistogram:
    """The bottom-level histogram: one polars ``group_by(geoid, cell)`` over the microdata.

    ``persons`` has ``geoid`` (Utf8 block GEOID) and one column per spec attribute (data
    codes). Raises HistogramError if a code is out of domain or a block is not in ``geography``.
    """
    lf = persons.lazy()
    counts = (lf.select(pl.col("geoid"), cell_expr(spec))
              .group_by("geoid", "cell").agg(pl.len().alias("count"))
              .collect(engine="streaming"))
    bad = counts.filter(pl.col("cell").is_null())
    if bad.height:
        n = int(bad["count"].sum())
        raise HistogramError(f"persons: {n} record(s) with attribute codes outside the {spec.name} "
                             f"spec, in blocks {bad['geoid'].head(5).to_list()}")
    blocks = geography.blocks
    try:
        codes = geoid_codes(counts["geoid"], blocks.digits, what="persons geoid values")
    except GeographyError as exc:
        raise HistogramError(f"persons: {exc}") from exc
    cell = counts["cell"].to_numpy().astype(np.int64, copy=False)
    # sort by (GEOID, cell) first: block order is GEOID order, and sorted lookups are cache-friendly
    if 10**blocks.digits * spec.n_cells < 2**62:
        order = np.argsort(codes * spec.n_cells + cell)
    else:  # a combined int64 key could overflow for very large specs
        order = np.lexsort((cell, codes))
    try:
        unit = blocks.index_of_codes(codes[order])
    except GeographyError as exc:
        raise HistogramError(f"persons: {exc}") from exc
    count = counts["count"].to_numpy().astype(np.int64, copy=False)[order]
    # group_by keys are unique, counts >= 1, the sort is by (unit, cell) and lookup checked units
    return SparseHistogram._trusted(blocks.name, blocks.n_units, spec.n_cells, unit, cell[order], count)


def aggregate_up(hist: SparseHistogram, geography: Geography) -> SparseHistogram:
    """The histogram of the level above ``hist.level``: each parent is the sum of its children."""
    child = geography.level(hist.level)
    parent = geography.parent_level(hist.level)
    if parent is None:
        raise HistogramError(f"{hist.level} is the top level; nothing above it")
    if hist.n_units != child.n_units:
        raise HistogramError(f"{hist.level} histogram has {hist.n_units} units, geography has {child.n_units}")
    pu = child.parent[hist.unit]
    key = pu * hist.n_cells + hist.cell
    if key.size == 0:
        return SparseHistogram(parent.name, parent.n_units, hist.n_cells, key, key, key)
    if parent.n_units * hist.n_cells <= DENSE_SUM_LIMIT:
        # few parents (nation, states, counties): a dense bincount beats sorting
        dense = np.bincount(key, weights=hist.count, minlength=parent.n_units * hist.n_cells)
        ukey = np.flatnonzero(dense)
        count = dense[ukey].astype(np.int64)  # exact: float64 holds integers below 2**53
    else:
        # within a parent, each child's entries are already sorted by cell: a stable sort merges runs
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        count = np.add.reduceat(hist.count[order], starts)
        ukey = key[starts]
    # unique sorted keys with positive sums: valid by construction
    return SparseHistogram._trusted(parent.name, parent.n_units, hist.n_cells,
                                    ukey // hist.n_cells, ukey % hist.n_cells, count.astype(np.int64, copy=False))


def build_person_histograms(persons: pl.LazyFrame | pl.DataFrame, geography: Geography,
                            spec: HistogramSpec) -> dict[str, SparseHistogram]:
    """Histograms of every level, ``{level name: SparseHistogram}`` in ``geography.levels`` order
    (top to bottom): one pass over the microdata for the blocks, upper levels by summing."""
    hists = {geography.blocks.name: build_block_histogram(persons, geography, spec)}
    h = hists[geography.blocks.name]
    for lv in reversed(geography.levels[:-1]):
        h = aggregate_up(h, geography)
        hists[lv.name] = h
    return {lv.name: hists[lv.name] for lv in geography.levels}


@dataclass(frozen=True, eq=False)
class UnitCounts:
    """Housing units and GQ facilities of every unit of one level (public invariants, except
    ``occupied``, which is the confidential units histogram).

    ``housing_units``: int64 ``(n_units,)``; ``occupied``: int64 ``(n_units,)`` occupied
    housing units; ``facilities``: int64 ``(n_units, 7)``, GQ facilities of types 1..7.
    """

    level: str
    housing_units: np.ndarray
    occupied: np.ndarray
    facilities: np.ndarray

    @property
    def n_units(self) -> int:
        return int(self.housing_units.shape[0])

    def sum_children(self, parent: LevelIndex) -> "UnitCounts":
        """Counts of ``parent``'s level: sums over each parent's contiguous children."""
        def up(x: np.ndarray) -> np.ndarray:
            out = np.zeros((parent.n_units,) + x.shape[1:], dtype=np.int64)
            # children of a parent are adjacent, so each sum is a difference of prefix sums
            cs = np.concatenate([np.zeros((1,) + x.shape[1:], np.int64), np.cumsum(x, axis=0)])
            out[:] = cs[parent.child_ptr[1:]] - cs[parent.child_ptr[:-1]]
            return out
        return UnitCounts(parent.name, up(self.housing_units), up(self.occupied), up(self.facilities))


def build_unit_counts(units: pl.LazyFrame | pl.DataFrame, geography: Geography) -> dict[str, UnitCounts]:
    """Unit counts of every level, ``{level name: UnitCounts}`` top to bottom.

    ``units`` has ``geoid`` (Utf8), ``kind`` (0 housing unit, 1..7 GQ type), ``occupied``
    (Boolean; ignored for facilities). One group_by at block level, upper levels by summing.
    """
    agg = (units.lazy()
           .group_by("geoid", "kind", "occupied").agg(pl.len().alias("n"))
           .collect(engine="streaming"))
    kind = agg["kind"].cast(pl.Int64).to_numpy()
    bad = (kind < 0) | (kind > N_GQ_TYPES)
    if bad.any():
        raise HistogramError(f"units: kind outside 0..{N_GQ_TYPES}: {sorted(set(kind[bad].tolist()))[:5]}")
    blocks = geography.blocks
    unit = _block_index(agg["geoid"], blocks, "units")
    n = agg["n"].to_numpy().astype(np.int64)
    occ = agg["occupied"].fill_null(False).to_numpy().astype(bool)
    hu = kind == 0
    housing = np.bincount(unit[hu], weights=n[hu], minlength=blocks.n_units).astype(np.int64)
    occupied = np.bincount(unit[hu & occ], weights=n[hu & occ], minlength=blocks.n_units).astype(np.int64)
    fac = np.zeros((blocks.n_units, N_GQ_TYPES), dtype=np.int64)
    np.add.at(fac, (unit[~hu], kind[~hu] - 1), n[~hu])
    out = {blocks.name: UnitCounts(blocks.name, housing, occupied, fac)}
    cur = out[blocks.name]
    for lv in reversed(geography.levels[:-1]):
        cur = cur.sum_children(lv)
        out[lv.name] = cur
    return {lv.name: out[lv.name] for lv in geography.levels}
