"""``tables/unbiased/``: the full estimator's real-valued, unbiased line estimates with standard
errors, beside the integer tables (``postprocess.estimator: full``, levels above the bottom one).

The integer tables are non-negative, consistent and integral, which biases small counts upwards
and large ones slightly downwards; some users (e.g. for regression inputs or aggregation over
many areas) prefer an unbiased estimate with a known standard error even when it is negative or
fractional. The hierarchical GLS estimate is exactly that: the best linear unbiased estimate from
every level's noisy measurements, consistent across levels (children add up to their parent
exactly, in real numbers), with exact standard errors from the design and the tree alone.

Rows: ``geoid, geolevel, name, table, line, label, estimate, se`` — ``se`` is ``moe90 / 1.645``
of the same line's margin of error before rounding, so ``estimate ± 1.645 se`` is its 90%
interval. ``dptab verify`` checks the rows, the standard errors (recomputed from the design and
the tree) and that the estimates add up across the hierarchy and within each table shell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.files import ROW_GROUP_ROWS, RowGroups
from pipeline.release.checks import CheckFailure
from pipeline.release.manifest import ReleaseError
from pipeline.release.tables import TableDef, TableSet, long_frame, unit_names
from pipeline.release.tree import GeoTree
from pipeline.release.uncertainty import Z90, DiskRows, RepeatedRows

#: additivity tolerance of the real-valued estimates (persons): float sums over ~10^4 children
TOLERANCE = 1e-6


def unbiased_frame(table: TableDef, level: str, geoids: np.ndarray, names: np.ndarray, estimates: np.ndarray,
                   moe90: np.ndarray) -> pl.DataFrame:
    """Rows of ``tables/unbiased/<table>.parquet`` for one level. ``estimates`` and ``moe90``:
    float ``(n_units, n_lines)``."""
    base = long_frame(table, level, geoids, names, np.zeros(np.shape(estimates), np.int64), None)
    return base.drop("count", "moe90").with_columns(
        pl.Series("estimate", np.asarray(estimates, np.float64).reshape(-1)),
        pl.Series("se", (np.asarray(moe90, np.float64) / Z90).reshape(-1)))


def _chunk_units(table: TableDef) -> int:
    """Units whose rows make about one row group (:data:`ROW_GROUP_ROWS` rows): what the writer
    and the verifier hold as text rows at a time (a national block-group level is ~17 M rows of a
    71-line table, several GB as text)."""
    return max(1, ROW_GROUP_ROWS // max(table.n_lines, 1))


def write_unbiased(tmp: Path, ts: TableSet, levels: Sequence[tuple[str, np.ndarray, Sequence[str]]],
                   unbiased: Mapping[tuple[str, str], np.ndarray],
                   moe: Mapping[tuple[str, str], np.ndarray | RepeatedRows | DiskRows],
                   tree: GeoTree | None = None) -> list[Path]:
    """Write ``tables/unbiased/<table>.parquet`` under ``tmp``. ``levels``: ``(level, geoids
    (n_units,), tables published there)`` of every level but the bottom one; ``tree``: a lookup
    geography, whose units carry its names. Streamed: the rows of :func:`_chunk_units` units
    at a time; a row group ends with each level (and every :data:`ROW_GROUP_ROWS` rows)."""
    def names(level: str, geoids: np.ndarray) -> np.ndarray:
        return tree.unit_names(level, geoids) if tree is not None and tree.is_lookup else unit_names(level, geoids)

    out_dir = tmp / "tables" / "unbiased"
    out_dir.mkdir(parents=True)
    paths = []
    for name, table in ts.tables.items():
        path = out_dir / f"{name}.parquet"
        groups = None
        step = _chunk_units(table)
        try:
            for level, geoids, published in levels:
                if name not in published:
                    continue
                est, m = unbiased.get((name, level)), moe.get((name, level))
                if est is None or m is None or m.ndim != 2:
                    raise ReleaseError(f"unbiased estimates of {name} at {level} need the full estimator's "
                                       "estimates and per-unit margins of error")
                nm = names(level, geoids)
                groups = groups or RowGroups(path)
                for s in range(0, max(len(geoids), 1), step):
                    e = min(s + step, len(geoids))
                    groups.add(unbiased_frame(table, level, geoids[s:e], nm[s:e], est[s:e], m[s:e]).to_arrow())
                groups.cut()
        finally:
            if groups is not None:
                groups.close()
        if groups is not None:
            paths.append(path)
    return paths


def verify_unbiased(root: Path, manifest: Mapping[str, Any], ts: TableSet, lts: Sequence[Any],
                    moe: Mapping[tuple[str, str], np.ndarray | RepeatedRows] | None, digits: "Mapping[str, int] | GeoTree"
                    ) -> list[CheckFailure]:
    """Each unbiased file's rows per level; its estimates add up to their parents and within each
    table shell (within :data:`TOLERANCE`); and with ``moe`` (the design's standard errors per
    (table, level), as :func:`pipeline.release.manifest.release_margins` gives them) every row
    against the row regenerated from its estimate and standard error (``None``: not regenerated,
    as the release writer's own check does not regenerate the count tables' rows either)."""
    from pipeline.release.verify_data import fail

    tree = GeoTree.of(digits, [lt.level for lt in lts])
    out: list[CheckFailure] = []
    for t in manifest["tables"]:
        name = t["name"]
        rel = f"tables/unbiased/{name}.parquet"
        path = root / rel
        if not path.is_file():
            continue  # a missing required file is reported by the contents check
        table = ts.tables[name]
        # streamed: a level's estimates (floats) at once, its text rows :func:`_chunk_units`
        # units at a time (slices of the file: only the row groups they fall in are read)
        rows = pq.ParquetFile(path).metadata.num_rows
        scan = pl.scan_parquet(path)
        step = _chunk_units(table)
        offset = 0
        by_level: dict[str, np.ndarray] = {}
        for lt in lts[:-1]:
            m = moe.get((name, lt.level)) if moe is not None else None
            n_units, n_lines = len(lt.geoids), table.n_lines
            n = n_units * n_lines
            got = max(0, min(n, rows - offset))
            if (moe is not None and m is None) or got != n:
                out.append(fail("unbiased", f"{rel}: {got} {lt.level} rows, expected {n}", name, lt.level))
                offset += n
                continue
            if m is None:
                est = scan.select("estimate").slice(offset, n).collect()["estimate"].to_numpy()
                est = est.reshape(n_units, n_lines)
            else:
                est = np.empty((n_units, n_lines))
                nm = tree.unit_names(lt.level, lt.geoids)
                same = True
                for s in range(0, n_units, step):
                    e = min(s + step, n_units)
                    part = scan.slice(offset + s * n_lines, (e - s) * n_lines).collect()
                    est[s:e] = part["estimate"].to_numpy().reshape(e - s, n_lines)
                    same = same and part.equals(unbiased_frame(table, lt.level, lt.geoids[s:e], nm[s:e],
                                                               est[s:e], m[s:e]))
                if not same:
                    out.append(fail("unbiased", f"{rel}: {lt.level} rows differ from the rows regenerated from the "
                                                 "estimates and the design's standard errors", name, lt.level))
            offset += n
            by_level[lt.level] = est
            for k, parts in table.sums.items():
                gap = np.abs(est[:, table.index(k)] - est[:, [table.index(j) for j in parts]].sum(axis=1))
                if gap.size and gap.max() > TOLERANCE * max(1.0, float(np.abs(est).max())):
                    out.append(fail("unbiased", f"{rel}: line {k} is not the sum of lines {list(parts)} "
                                                 f"(off by {gap.max():.3g})", name, lt.level))
        if offset < rows:
            out.append(fail("unbiased", f"{rel}: {rows - offset} row(s) beyond the published levels", name))
        for upper, lower in zip(lts[:-2], lts[1:-1]):
            if upper.level not in by_level or lower.level not in by_level:
                continue
            idx, _ = tree.parent_positions(upper.level, upper.geoids, lower.level, lower.geoids)
            sums = np.zeros_like(by_level[upper.level])
            np.add.at(sums, idx, by_level[lower.level])
            gap = np.abs(sums - by_level[upper.level])
            if gap.size and gap.max() > TOLERANCE * max(1.0, float(np.abs(sums).max())):
                out.append(fail("unbiased", f"{rel}: the {lower.level} estimates do not add up to the {upper.level} "
                                             f"estimates (off by {gap.max():.3g})", name, lower.level))
    return out
