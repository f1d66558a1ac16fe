"""Microdata -> sparse histograms of every geographic level, and unit counts (public invariants).

Persons are read once: a single polars ``group_by(geoid, cell)`` gives the block histogram
(the cell index is computed in polars from the spec's attribute codes). Every upper level is
the sum of its children's histograms, computed from the level below with array operations —
the microdata is never scanned twice. Histograms are sparse: ``(unit, cell, count)`` int64
arrays sorted by ``(unit, cell)`` with positive counts only, since most block cells are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.model.geography import Geography, GeographyError, LevelIndex, geoid_codes, sorted_examples
from pipeline.model.histogram import HistogramError, SparseHistogram
from pipeline.model.spec import HistogramSpec

N_GQ_TYPES = 7  # GQ facility kinds 1..7 (the hhgq codes of the pl94 spec)
DENSE_SUM_LIMIT = 4_000_000  # parents x cells up to which aggregate_up sums densely (32 MB)


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
        return blocks.index_of_codes(blocks.codes_of(geoids) if blocks.is_lookup
                                     else geoid_codes(geoids, blocks.digits, what=f"{what} geoid values"))
    except GeographyError as exc:
        raise HistogramError(f"{what}: {exc}") from exc


def _keyed_block_histogram(lf: pl.LazyFrame, blocks: LevelIndex, spec: HistogramSpec) -> SparseHistogram | None:
    """The block histogram from one ``group_by`` on a single integer key, ``code * n_cells +
    cell`` (a digit-GEOID geography whose codes times cells fit in int64), or None when that
    cannot be used or some record has no valid key (the caller's string pass then reports it).

    Why: polars' group_by on (GEOID string, cell) holds each group's string, and its peak grew
    ~190 bytes per block x cell entry (7.2 GB for the 331 M-person US); on one integer key it
    is ~2.5x smaller and faster. Sorted by the key, the entries are in (block code, cell) order,
    which is (unit, cell) order: the same arrays as the string pass."""
    d = blocks.digits
    if blocks.is_lookup or d <= 0 or 10**d * spec.n_cells >= 2**63:
        return None
    g = pl.col("geoid")
    code = g.cast(pl.UInt64, strict=False)
    # the exact GEOID check of geoid_codes: d bytes, an unsigned integer parse, no leading '+'
    ok = code.is_not_null() & (g.str.len_bytes() == d) & ~g.str.starts_with("+")
    key = pl.when(ok).then(code.cast(pl.Int64) * spec.n_cells + cell_expr(spec).cast(pl.Int64)).otherwise(None)
    counts = (lf.select(key.alias("key")).group_by("key").agg(pl.len().alias("count"))
              .sort("key").collect(engine="streaming"))
    if counts["key"].null_count():
        return None
    k = counts["key"].to_numpy().astype(np.int64, copy=False)
    codes = k // spec.n_cells
    try:
        unit = blocks.index_of_codes(codes)
    except GeographyError as exc:
        raise HistogramError(f"persons: {exc}") from exc
    cell = k - codes * spec.n_cells
    count = counts["count"].to_numpy().astype(np.int64, copy=False)
    return SparseHistogram._trusted(blocks.name, blocks.n_units, spec.n_cells, unit, cell, count)


def build_block_histogram(persons: pl.LazyFrame | pl.DataFrame, geography: Geography,
                          spec: HistogramSpec) -> SparseHistogram:
    """The bottom-level histogram: one polars ``group_by(geoid, cell)`` over the microdata.

    ``persons`` has ``geoid`` (Utf8 block GEOID) and one column per spec attribute (data
    codes). Raises HistogramError if a code is out of domain or a block is not in ``geography``.
    """
    lf = persons.lazy()
    keyed = _keyed_block_histogram(lf, geography.blocks, spec)
    if keyed is not None:
        return keyed
    # a lookup geography, a spec too large for one integer key, or a record the keyed pass
    # could not place: the same histogram (or the error naming what is wrong) by GEOID strings
    counts = (lf.select(pl.col("geoid"), cell_expr(spec))
              .group_by("geoid", "cell").agg(pl.len().alias("count"))
              .collect(engine="streaming"))
    bad = counts.filter(pl.col("cell").is_null())
    if bad.height:
        n = int(bad["count"].sum())
        # (group_by's output order varies from run to run: the first blocks in GEOID order)
        raise HistogramError(f"persons: {n} record(s) with attribute codes outside the {spec.name} "
                             f"spec, in blocks {sorted_examples(bad['geoid'])}")
    blocks = geography.blocks
    try:
        codes = (blocks.codes_of(counts["geoid"]) if blocks.is_lookup
                 else geoid_codes(counts["geoid"], blocks.digits, what="persons geoid values"))
    except GeographyError as exc:
        raise HistogramError(f"persons: {exc}") from exc
    cell = counts["cell"].to_numpy().astype(np.int64, copy=False)
    # sort by (GEOID, cell) first: block order is GEOID order, and sorted lookups are cache-friendly
    if (blocks.n_units if blocks.is_lookup else 10**blocks.digits) * spec.n_cells < 2**62:
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
