"""Consistency checks of published tables, run on every release and by ``dptab verify``.

The checks (ARCHITECTURE §8; declarations in ``schemas/tables/pl94.yaml``):

- ``hierarchy``: every line of a parent unit equals the sum of that line over its children;
- ``additivity``: lines add up inside a table (``sums``: P1 1 = 2 + 9, …);
- ``cross_table``: the same totals agree across tables (P1 1 = P2 1; P1 1 = P5 1 + household
  population; …) and a table of a sub-population never exceeds its whole (P3 ≤ P1 line by line);
- ``invariant``: state totals and block housing-unit counts equal the declared invariants;
- ``non_negative``: no count is negative;
- ``measurements``: the published noisy measurements match the design
  (:func:`pipeline.release.measurements.measurement_checks`).

They work on :class:`LevelTables` (per level: sorted GEOIDs and one int64 ``(n_units, n_lines)``
array per table), which both the release writer (from histograms) and the verifier (from the
Parquet files) build, so the same code judges both. Every check is vectorised over units; a
failure names the check, table, line, level and GEOID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pipeline.release.tables import LevelTables, TableSet
from pipeline.release.tree import GeoTree

#: failures reported individually per (check, table, level); the rest are counted in one summary
MAX_PER_GROUP = 20


@dataclass(frozen=True)
class CheckFailure:
    """One failed check at one unit (or a summary of further failures of the same group)."""

    check: str
    table: str
    line: int | None
    geolevel: str
    geoid: str
    expected: int | None = None
    found: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.table == "*" and self.line is None and not self.geolevel and self.expected is None:
            return f"[{self.check}] {self.detail}"  # about a file or the manifest, not a table cell
        where = f"{self.table}" + (f" line {self.line}" if self.line is not None else "")
        at = f"{self.geolevel} {self.geoid!r}" if self.geolevel else ""
        vals = f": expected {self.expected}, found {self.found}" if self.expected is not None else ""
        return f"[{self.check}] {where} at {at}{vals}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Invariants:
    """Counts declared public and exact before any noise was drawn.

    ``state_totals``: persons per state GEOID (the nation total is their sum);
    ``block_geoids`` (sorted, ``(n_blocks,)``) with ``block_housing_units`` (int64 ``(n_blocks,)``).
    """

    state_totals: Mapping[str, int] | None = None
    block_geoids: np.ndarray | None = None
    block_housing_units: np.ndarray | None = None

    def to_json(self) -> dict:
        """The manifest's ``invariants`` section (block values live in their own Parquet file)."""
        out: dict = {"state_totals": None, "block_housing_units": None}
        if self.state_totals is not None:
            out["state_totals"] = {str(k): int(v) for k, v in sorted(self.state_totals.items())}
        if self.block_housing_units is not None:
            out["block_housing_units"] = {
                "blocks": int(len(self.block_housing_units)),
                "total": int(np.sum(self.block_housing_units)),
                "file": "invariants/block_housing_units.parquet",
            }
        return out


class _Collector:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failures: list[CheckFailure] = []

    def add(self, check: str, table: str, level: str, geoids: np.ndarray, bad_rows: np.ndarray,
            lines: Sequence[int | None], expected: np.ndarray | None, found: np.ndarray | None,
            detail: str = "") -> None:
        """Record failures at ``bad_rows`` (indices into ``geoids``) with per-row line numbers."""
        n = len(bad_rows)
        for k in range(min(n, self.limit)):
            r = int(bad_rows[k])
            self.failures.append(CheckFailure(
                check, table, None if lines[k] is None else int(lines[k]), level, str(geoids[r]),
                None if expected is None else int(expected[k]), None if found is None else int(found[k]), detail))
        if n > self.limit:
            self.failures.append(CheckFailure(check, table, None, level, "", detail=f"{n - self.limit} more failures"
                                              + (f"; {detail}" if detail else "")))


def _line_failures(col: _Collector, check: str, table: str, level: str, geoids: np.ndarray,
                   numbers: Sequence[int], expected: np.ndarray, found: np.ndarray, detail: str = "") -> None:
    """Compare two ``(n_units, n_lines)`` arrays and record each differing (unit, line)."""
    rows, cols = np.nonzero(expected != found)
    if rows.size:
        nums = np.asarray(numbers)[cols]
        col.add(check, table, level, geoids, rows, list(nums), expected[rows, cols], found[rows, cols], detail)


def children_of(parent_geoids: np.ndarray, child_geoids: np.ndarray,
                parent_digits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted GEOIDs: ``(start, stop)`` child ranges of each parent, and orphan child rows.

    Children sort by their GEOID prefix, so each parent's children are contiguous.
    """
    child = np.asarray(child_geoids).astype(str)
    # casting to a shorter fixed-width string type truncates: the GEOID prefix, vectorised
    prefix = child.astype(f"<U{parent_digits}") if parent_digits > 0 else np.full(child.shape, "", dtype="<U1")
    parents = np.asarray(parent_geoids).astype(str)
    if prefix.size == 0:
        return np.zeros(len(parents), np.int64), np.zeros(len(parents), np.int64), np.zeros(0, np.int64)
    start = np.searchsorted(prefix, parents, side="left")
    stop = np.searchsorted(prefix, parents, side="right")
    pos = np.clip(np.searchsorted(parents, prefix), 0, max(len(parents) - 1, 0))
    orphan = np.nonzero(parents[pos] != prefix)[0] if len(parents) else np.arange(len(prefix))
    return start.astype(np.int64), stop.astype(np.int64), orphan


def _sum_ranges(values: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Sums of ``values[start[i]:stop[i]]`` along axis 0 (empty range → 0), via a cumulative sum."""
    cs = np.zeros((values.shape[0] + 1,) + values.shape[1:], dtype=np.int64)
    np.cumsum(values, axis=0, out=cs[1:])
    return cs[stop] - cs[start]


def _children_by_tree(tree: GeoTree, parent: LevelTables, child: LevelTables
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`children_of` for a lookup geography: children sit after their parents in unit order."""
    pos, found = tree.parent_positions(parent.level, parent.geoids, child.level, child.geoids)
    orphan = np.nonzero(~found)[0]
    pos = np.where(found, pos, -1)
    n = len(parent.geoids)
    start = np.searchsorted(pos, np.arange(n), side="left").astype(np.int64)
    stop = np.searchsorted(pos, np.arange(n), side="right").astype(np.int64)
    return start, stop, orphan


def run_checks(tables: TableSet, levels: Sequence[LevelTables], digits: "Mapping[str, int] | GeoTree",
               invariants: Invariants | None = None, limit: int = MAX_PER_GROUP) -> list[CheckFailure]:
    """Every consistency check over ``levels`` (top to bottom); an empty list means all pass.

    ``digits[level]`` is the GEOID prefix length of a level (``schemas/geolevels.yaml``), or a
    :class:`GeoTree` (a lookup geography's published parent codes).
    Tables missing from a level are skipped (e.g. H1 when no units were published).
    """
    tree = GeoTree.of(digits, [lt.level for lt in levels])
    col = _Collector(limit)
    for lt in levels:
        g = np.asarray(lt.geoids).astype(str)
        if g.size > 1 and not tree.in_order(lt.level, g):
            col.add("structure", "*", lt.level, g, np.array([0]), [None], None, None,
                    "GEOIDs not unique and in the geography's order" if tree.is_lookup else "GEOIDs not sorted and unique")
        for name, counts in lt.counts.items():
            t = tables.tables[name]
            rows, cols = np.nonzero(counts < 0)
            if rows.size:
                col.add("non_negative", name, lt.level, g, rows, list(np.asarray(t.numbers)[cols]),
                        np.zeros(rows.size, np.int64), counts[rows, cols])
            for k, parts in t.sums.items():
                want = counts[:, [t.index(x) for x in parts]].sum(axis=1)
                got = counts[:, t.index(k)]
                bad = np.nonzero(want != got)[0]
                if bad.size:
                    col.add("additivity", name, lt.level, g, bad, [k] * bad.size, want[bad], got[bad],
                            f"line {k} = sum of lines {list(parts)}")
        _cross_checks(col, tables, lt, g)
    for parent, child in zip(levels[:-1], levels[1:]):
        if tree.is_lookup:
            start, stop, orphan = _children_by_tree(tree, parent, child)
        else:
            start, stop, orphan = children_of(parent.geoids, child.geoids, tree.digits[parent.level])
        cg = np.asarray(child.geoids).astype(str)
        if orphan.size:
            col.add("hierarchy", "*", child.level, cg, orphan, [None] * orphan.size, None, None,
                    f"unit has no parent in level {parent.level}")
        pg = np.asarray(parent.geoids).astype(str)
        for name, pc in parent.counts.items():
            if name not in child.counts:
                continue
            sums = _sum_ranges(child.counts[name], start, stop)
            _line_failures(col, "hierarchy", name, parent.level, pg, tables.tables[name].numbers, sums, pc,
                           f"parent line vs sum over {child.level} children")
    if invariants is not None:
        _invariant_checks(col, tables, levels, invariants, tree.is_lookup)
    return col.failures


def _operand(tables: TableSet, lt: LevelTables, ref: tuple[str, int | None]) -> np.ndarray | None:
    name, line = ref
    if line is None:
        return lt.check_lines.get(name)
    if name not in lt.counts:
        return None
    return lt.counts[name][:, tables.tables[name].index(line)]


def _cross_checks(col: _Collector, tables: TableSet, lt: LevelTables, g: np.ndarray) -> None:
    for left, right in tables.equal_checks:
        lv = _operand(tables, lt, left)
        rv = [_operand(tables, lt, r) for r in right]
        if lv is None or any(v is None for v in rv):
            continue
        want = np.sum(rv, axis=0)
        bad = np.nonzero(want != lv)[0]
        if bad.size:
            desc = " + ".join(r[0] if r[1] is None else f"{r[0]} line {r[1]}" for r in right)
            col.add("cross_table", left[0], lt.level, g, bad, [left[1]] * bad.size, want[bad], lv[bad],
                    f"{left[0]} line {left[1]} = {desc}")
    for part, whole in tables.subset_checks:
        if part not in lt.counts or whole not in lt.counts:
            continue
        pc, wc = lt.counts[part], lt.counts[whole]
        rows, cols = np.nonzero(pc > wc)
        if rows.size:
            col.add("cross_table", part, lt.level, g, rows, list(np.asarray(tables.tables[part].numbers)[cols]),
                    wc[rows, cols], pc[rows, cols], f"{part} must not exceed {whole} (value shown as expected: the bound)")


def _invariant_checks(col: _Collector, tables: TableSet, levels: Sequence[LevelTables], inv: Invariants,
                      lookup: bool = False) -> None:
    """The declared totals (``state_totals``: at the level named ``state``, or the top level of a
    geography without one; the level above must add up to them) and the bottom level's housing
    units, against the total lines of the persons and units tables (pl94: P1 line 1, H1 line 1)."""
    by_level = {lt.level: lt for lt in levels}
    p_total, h_total = tables.total_line("persons"), tables.total_line("units")
    # a lookup geography declares its top level's total, whatever its levels are called
    tl = "state" if "state" in by_level and not lookup else (levels[0].level if levels else "")
    if inv.state_totals is not None and p_total is not None and tl in by_level and p_total[0] in by_level[tl].counts:
        pt, pline = p_total
        p1_total = tables.tables[pt].index(pline)
        lt = by_level[tl]
        g = np.asarray(lt.geoids).astype(str)
        got = lt.counts[pt][:, p1_total]
        want = np.array([int(inv.state_totals.get(x, -1)) for x in g], dtype=np.int64)
        missing = set(inv.state_totals) - set(g.tolist())
        for m in sorted(missing):
            col.failures.append(CheckFailure("invariant", pt, pline, tl, m, int(inv.state_totals[m]), None,
                                             f"declared {tl} total has no published {tl}"))
        bad = np.nonzero(want != got)[0]
        if bad.size:
            col.add("invariant", pt, tl, g, bad, [pline] * bad.size, want[bad], got[bad], f"{tl} total population")
        top = levels[0].level
        if top != tl and pt in by_level[top].counts:
            nat = int(by_level[top].counts[pt][0, p1_total])
            total = int(sum(int(v) for v in inv.state_totals.values()))
            if nat != total:
                col.failures.append(CheckFailure("invariant", pt, pline, top, "", total, nat,
                                                 f"{top} total = sum of declared {tl} totals"))
    bottom = levels[-1].level if levels else ""
    if (inv.block_housing_units is not None and h_total is not None and bottom in by_level
            and h_total[0] in by_level[bottom].counts):
        ht, hline = h_total
        lt = by_level[bottom]
        g = np.asarray(lt.geoids).astype(str)
        ig = np.asarray(inv.block_geoids).astype(str)
        iv = np.asarray(inv.block_housing_units, dtype=np.int64)
        got = lt.counts[ht][:, tables.tables[ht].index(hline)]
        order = np.argsort(ig, kind="stable")  # the invariant's units in any order (a lookup's unit order)
        ig, iv = ig[order], iv[order]
        pos = np.clip(np.searchsorted(ig, g), 0, max(len(ig) - 1, 0))
        found = (ig[pos] == g) if len(ig) else np.zeros(len(g), bool)
        want = np.where(found, iv[pos] if len(ig) else 0, 0)  # a published block absent from the invariant has 0
        bad = np.nonzero(want != got)[0]
        if bad.size:
            col.add("invariant", ht, bottom, g, bad, [hline] * bad.size, want[bad], got[bad],
                    f"{bottom} housing units")
        gs = np.sort(g)
        gpos = np.clip(np.searchsorted(gs, ig), 0, max(len(gs) - 1, 0))
        absent = np.nonzero(((gs[gpos] != ig) if len(gs) else np.ones(len(ig), bool)) & (iv != 0))[0]
        if absent.size:
            col.add("invariant", ht, bottom, ig, absent, [hline] * absent.size, iv[absent],
                    np.zeros(absent.size, np.int64), f"{bottom} with declared housing units is not published")
