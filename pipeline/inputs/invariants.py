"""The public invariants of a run, written once as their own files.

An invariant is a count that is published without noise because the config declares it public
(2020 semantics, ARCHITECTURE §6). The inputs stage is the only code that reads the
confidential inputs; it derives the declared invariants here and writes them to
``invariants/<level>.parquet`` in the run directory. The constraint builder of the solve stage
and the release read only these files — never a confidential file — to get invariants.

Columns of ``invariants/<level>.parquet`` (one row per unit of the level, in geography order),
each present only when its invariant is declared:

- ``persons`` (int64): total persons — nation and state levels, ``invariants.state_totals``;
- ``housing_units`` (int64): housing units — every level, ``invariants.block_housing_units``;
- ``facilities_1`` … ``facilities_7`` (int64): group-quarters facilities of types 1–7 — every
  level, ``invariants.gq_facilities``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.files import write_parquet_atomic
from pipeline.inputs.histograms import N_GQ_TYPES, UnitCounts
from pipeline.model.config import InvariantsConfig
from pipeline.model.histogram import SparseHistogram

#: rows per row group of an invariants file: a shard reads its units' rows alone (a national
#: block level is millions of rows; a shard's a few thousand), from one or two groups
INVARIANT_GROUP_ROWS = 1 << 16

#: levels whose persons totals are held exactly under ``invariants.state_totals``
TOTAL_LEVELS = ("nation", "state")


@dataclass(frozen=True)
class LevelInvariants:
    """The declared invariants of every unit of one level; ``None`` where not declared.

    ``persons``: int64 ``(n_units,)``; ``housing_units``: int64 ``(n_units,)``;
    ``facilities``: int64 ``(n_units, 7)`` GQ facilities of types 1..7.
    """

    level: str
    persons: np.ndarray | None = None
    housing_units: np.ndarray | None = None
    facilities: np.ndarray | None = None


def declared(level: str, persons: SparseHistogram, units: UnitCounts, inv: InvariantsConfig,
             total_level: bool | None = None) -> LevelInvariants:
    """The invariants ``inv`` declares public for one level, from its true histograms.
    ``total_level``: whether ``invariants.state_totals`` holds this level's persons totals
    (default: the US levels :data:`TOTAL_LEVELS`; a lookup geography passes True for its top level)."""
    totals = level in TOTAL_LEVELS if total_level is None else total_level
    return LevelInvariants(
        level,
        persons=persons.totals() if inv.state_totals and totals else None,
        housing_units=units.housing_units if inv.block_housing_units else None,
        facilities=units.facilities if inv.gq_facilities else None,
    )


def write_invariants(li: LevelInvariants, path: Path, n_units: int) -> None:
    """Write one level's declared invariants (only the declared columns; see module doc)."""
    cols: dict[str, np.ndarray] = {}
    if li.persons is not None:
        cols["persons"] = np.asarray(li.persons, dtype=np.int64)
    if li.housing_units is not None:
        cols["housing_units"] = np.asarray(li.housing_units, dtype=np.int64)
    if li.facilities is not None:
        for g in range(N_GQ_TYPES):
            cols[f"facilities_{g + 1}"] = np.asarray(li.facilities[:, g], dtype=np.int64)
    # a level with nothing declared still gets its file (row count = units), so readers can
    # tell "declared nothing" from "inputs stage did not run"
    frame = pl.DataFrame(cols) if cols else pl.DataFrame({"_unit": np.arange(n_units, dtype=np.int64)})
    write_parquet_atomic(frame, path, row_group_size=INVARIANT_GROUP_ROWS)


def read_invariants(level: str, path: Path, housing_units_only: bool = False,
                    units: tuple[int, int] | None = None) -> LevelInvariants:
    """Read one level's invariants file written by :func:`write_invariants`; with
    ``housing_units_only`` only its housing units (what a release publishes of the blocks: the
    facilities are 7 of the block level's 8 columns, ~0.3 GB for the US); with ``units=(start,
    stop)`` only those units' rows (row ``i`` of each array is unit ``start + i``), read from the
    row groups that hold them."""
    import pyarrow.parquet as pq

    if units is not None:
        pf = pq.ParquetFile(path)
        start, stop = units
        if not 0 <= start <= stop <= pf.metadata.num_rows:
            raise ValueError(f"{path}: units {start}:{stop} outside its {pf.metadata.num_rows} rows")
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop, side="left")) if stop > start else first - 1
        groups = list(range(first, last + 1))  # (stop <= the rows: last is a real group)
        offset = int(ends[first - 1]) if first > 0 else 0
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        df = pl.DataFrame(pl.from_arrow(table.slice(start - offset, stop - start)))
    elif housing_units_only:
        has = "housing_units" in pq.read_schema(path).names
        df = pl.read_parquet(path, columns=["housing_units"]) if has else pl.DataFrame()
    else:
        df = pl.read_parquet(path)

    def col(name: str) -> np.ndarray | None:
        return df[name].to_numpy().astype(np.int64) if name in df.columns else None

    fac = None
    if "facilities_1" in df.columns:
        fac = np.stack([df[f"facilities_{g}"].to_numpy() for g in range(1, N_GQ_TYPES + 1)], axis=1).astype(np.int64)
    return LevelInvariants(level, persons=col("persons"), housing_units=col("housing_units"), facilities=fac)


def units_truth(u: UnitCounts) -> SparseHistogram:
    """The confidential units histogram of one level: ``(vacant, occupied)`` housing units."""
    return SparseHistogram.from_dense(u.level, np.stack([u.housing_units - u.occupied, u.occupied], axis=1))
