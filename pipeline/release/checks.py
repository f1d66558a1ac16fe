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
import scipy.sparse as sp

from pipeline.release.tables import LevelTables, TableSet
from pipeline.release.tree import CodedGeoids, GeoTree, find_units

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
    ``block_geoids`` (sorted, ``(n_blocks,)``) with ``block_housing_units`` (int64 ``(n_blocks,)``);
    ``block_geoids`` may be the blocks' int64 codes (the GEOIDs read as integers) in a digit-prefix
    geography (8 bytes a block instead of ~60: the release writer's).
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
    """Failures grouped by (check, table, level, detail): the first ``limit`` of a group are
    recorded individually, the rest counted in one summary per group (:meth:`result`), whether a
    level arrives whole or in chunks of units."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failures: list[CheckFailure] = []
        self.extra: dict[tuple[str, str, str, str], int] = {}
        self.seen: dict[tuple[str, str, str, str], int] = {}

    def add(self, check: str, table: str, level: str, geoids: np.ndarray, bad_rows: np.ndarray,
            lines: Sequence[int | None], expected: np.ndarray | None, found: np.ndarray | None,
            detail: str = "") -> None:
        """Record failures at ``bad_rows`` (indices into ``geoids``) with per-row line numbers."""
        key = (check, table, level, detail)
        n, done = len(bad_rows), self.seen.get(key, 0)
        take = max(0, min(n, self.limit - done))
        for k in range(take):
            r = int(bad_rows[k])
            self.failures.append(CheckFailure(
                check, table, None if lines[k] is None else int(lines[k]), level, str(geoids[r]),
                None if expected is None else int(expected[k]), None if found is None else int(found[k]), detail))
        self.seen[key] = done + n
        if n > take:
            self.extra[key] = self.extra.get(key, 0) + n - take

    def result(self) -> list[CheckFailure]:
        """Every recorded failure, then one summary per group with more than ``limit``."""
        return self.failures + [CheckFailure(check, table, None, level, "", detail=f"{n} more failures"
                                             + (f"; {detail}" if detail else ""))
                                for (check, table, level, detail), n in self.extra.items()]


def _line_failures(col: _Collector, check: str, table: str, level: str, geoids: np.ndarray,
                   numbers: Sequence[int], expected: np.ndarray, found: np.ndarray, detail: str = "") -> None:
    """Compare two ``(n_units, n_lines)`` arrays and record each differing (unit, line)."""
    rows, cols = np.nonzero(expected != found)
    if rows.size:
        nums = np.asarray(numbers)[cols]
        col.add(check, table, level, geoids, rows, list(nums), expected[rows, cols], found[rows, cols], detail)


def _narrow(a: np.ndarray) -> np.ndarray:
    """``a`` (integer counts) in the narrowest of int16 / int32 / int64 holding its values: a
    kept parent level (the US block groups: 240 k units x ~300 lines) in ~1/4 of the bytes."""
    if not a.size:
        return a
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    return a


def _parent_positions(tree: GeoTree, parent_level: str, parent_geoids: np.ndarray, child_level: str,
                      child_geoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, found)``: each child's parent among ``parent_geoids`` (sorted GEOIDs, or a lookup
    level's published order), int64 ``(n_children,)`` and bool ``(n_children,)``."""
    if tree.is_lookup:
        return tree.parent_positions(parent_level, parent_geoids, child_level, child_geoids)
    parents = np.asarray(parent_geoids).astype(str, copy=False)
    child = np.asarray(child_geoids).astype(str, copy=False)
    d = tree.digits[parent_level]
    # casting to a shorter fixed-width string type truncates: the GEOID prefix, vectorised
    prefix = child.astype(f"<U{d}") if d > 0 else np.full(child.shape, "", dtype="<U1")
    if not len(parents):
        return np.zeros(len(child), np.int64), np.zeros(len(child), bool)
    pos = np.clip(np.searchsorted(parents, prefix), 0, len(parents) - 1).astype(np.int64)
    return pos, parents[pos] == prefix


class ReleaseChecks:
    """Every consistency check, fed level by level (top to bottom) in chunks of units, so a
    release is checked holding one chunk of a level plus the level above's counts.

    ``begin_level(level, keep)``, then ``add(chunk)`` for consecutive chunks of the level's
    units in order (a :class:`LevelTables` whose arrays hold the chunk's rows), then
    ``end_level()``; :meth:`failures` at the end. The hierarchy check keeps the parent level's
    counts, ``(n_parent_units, n_lines)`` per table in the narrowest integer type holding them
    (int16 for block groups, as a rule), and the children's sums of the parents they may still
    add to: children come grouped by parent in the parents' order, so a parent
    before the first parent of a chunk has all its children and is compared then (a child out
    of that order fails the ``structure`` check and its parent the comparison). The rest is
    checked chunk by chunk.
    """

    def __init__(self, tables: TableSet, tree: GeoTree, invariants: Invariants | None = None,
                 limit: int = MAX_PER_GROUP) -> None:
        self.ts, self.tree, self.inv = tables, tree, invariants
        self.col = _Collector(limit)
        self.levels: list[str] = []
        self.parent: LevelTables | None = None      # the level above, whole
        self.current: LevelTables | None = None     # this level, gathered only while it may be a parent
        self.sums: dict[str, np.ndarray] = {}      # children's counts summed per parent of the window
        self.window = 0                             # parents before this one are compared
        self.child_tables: set[str] = set()         # the parent's tables this level has
        self.last: str | None = None                # the last GEOID of the previous chunk (order check)
        self.p_total, self.h_total = tables.total_line("persons"), tables.total_line("units")
        self.state_seen: set[str] = set()
        self.state_checked = self.h_checked = False  # was the invariant's level (with its table) seen
        if invariants is not None and invariants.block_housing_units is not None:
            ig = np.asarray(invariants.block_geoids)
            # integer block codes of a digit-prefix geography (the release writer's, 8 bytes a
            # block instead of ~60): each chunk's GEOIDs are read as integers to compare
            codes = ig.dtype.kind in "iu"
            ig = ig.astype(np.int64, copy=False) if codes else ig.astype(str, copy=False)
            hu = np.asarray(invariants.block_housing_units, dtype=np.int64)
            if ig.size > 1 and not bool(np.all(ig[1:] > ig[:-1])):
                # the invariant's units in any order (a lookup's unit order); sorted ones (the US
                # blocks: a national array of GEOIDs) are searched as they are, not copied
                order = np.argsort(ig, kind="stable")
                ig, hu = ig[order], hu[order]
            # codes are looked up as the checks' coded blocks are (one lookup of GEOIDs among units)
            self.inv_geoids = CodedGeoids(ig, self.tree.digits[self.tree.levels[-1]]) if codes else ig
            self.inv_hu = hu
            self.inv_seen = np.zeros(len(ig), bool)

    def _state_level(self) -> str:
        # a lookup geography declares its top level's total, whatever its levels are called
        names = self.tree.levels
        return "state" if "state" in names and not self.tree.is_lookup else (names[0] if names else "")

    def begin_level(self, level: str, keep: bool) -> None:
        """Start ``level``; ``keep``: gather its counts whole (another level follows below it)."""
        self.levels.append(level)
        self.last = None
        self.sums, self.window, self.child_tables = {}, 0, set()
        self.current = LevelTables(level, np.zeros(0, dtype=str), {}) if keep else None
        self._chunks: list[LevelTables] = []

    def add(self, lt: LevelTables) -> None:
        """Check one chunk of the current level's units (the next ones in unit order)."""
        col, tables = self.col, self.ts
        g = np.asarray(lt.geoids).astype(str, copy=False)
        head = g if self.last is None else np.concatenate([np.array([self.last]), g])
        if head.size > 1 and not self.tree.in_order(lt.level, head):
            col.add("structure", "*", lt.level, head, np.array([0]), [None], None, None,
                    "GEOIDs not unique and in the geography's order" if self.tree.is_lookup
                    else "GEOIDs not sorted and unique")
        if g.size:
            self.last = str(g[-1])
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
        self._hierarchy_chunk(lt, g)
        self._invariant_chunk(lt, g)
        if self.current is not None:  # (its own dict: end_level frees each table's chunks as it joins them)
            self._chunks.append(LevelTables(lt.level, lt.geoids, {n: _narrow(c) for n, c in lt.counts.items()}))

    def _hierarchy_chunk(self, lt: LevelTables, g: np.ndarray) -> None:
        """Add the chunk's counts to their parents' sums; report units without a parent."""
        parent = self.parent
        if parent is None:
            return
        pos, found = _parent_positions(self.tree, parent.level, parent.geoids, lt.level, g)
        orphan = np.nonzero(~found)[0]
        if orphan.size:
            self.col.add("hierarchy", "*", lt.level, g, orphan, [None] * orphan.size, None, None,
                         f"unit has no parent in level {parent.level}")
        self.child_tables |= set(lt.counts) & set(parent.counts)
        ok = np.nonzero(found)[0]
        if not ok.size:
            return
        # the parents before this chunk's first one have all their children: compare them
        self._compare_parents(min(int(pos[ok].min()), len(parent.geoids)), lt.level)
        uniq, inv = np.unique(pos[ok], return_inverse=True)
        # (parents of the chunk x children of the chunk) 0/1 matrix: the chunk's sums per parent
        agg = sp.csr_matrix((np.ones(ok.size, np.int64), (inv.reshape(-1), ok)), shape=(len(uniq), len(g)))
        # (a child of a parent already compared — out of order — adds to the window's first parent
        # instead; the structure check reports the order and the comparison that parent)
        at = np.maximum(uniq, self.window) - self.window
        for name, pc in parent.counts.items():
            if name not in lt.counts:
                continue
            acc = self.sums.get(name)
            if acc is None or len(acc) <= int(at[-1]):  # the window grows to the chunk's last parent
                grown = np.zeros((int(at[-1]) + 1, pc.shape[1]), np.int64)
                if acc is not None:
                    grown[:len(acc)] = acc
                acc = self.sums[name] = grown
            np.add.at(acc, at, np.asarray(agg @ lt.counts[name], dtype=np.int64))

    def _compare_parents(self, upto: int, level: str) -> None:
        """Compare the parents ``window:upto`` with their children's sums and move the window on."""
        parent = self.parent
        if parent is None or upto <= self.window:
            return
        lo, k = self.window, upto - self.window
        pg = np.asarray(parent.geoids[lo:upto]).astype(str, copy=False)
        for name, pc in parent.counts.items():
            acc = self.sums.get(name)
            got = np.zeros((k, pc.shape[1]), np.int64)
            if acc is not None:
                got[:min(k, len(acc))] = acc[:k]
                self.sums[name] = acc[k:]
            if name in self.child_tables:
                _line_failures(self.col, "hierarchy", name, parent.level, pg, self.ts.tables[name].numbers,
                               got, pc[lo:upto], f"parent line vs sum over {level} children")
        self.window = upto

    def end_level(self) -> None:
        """Finish the current level: compare the level above with its children's sums."""
        level = self.levels[-1]
        if self.parent is not None:  # the parents after the last child's (and any without children)
            self._compare_parents(len(self.parent.geoids), level)
        if self.inv is not None and self.inv.state_totals is not None and self.state_checked and level == self._state_level():
            pt = self.p_total
            assert pt is not None
            for m in sorted(set(self.inv.state_totals) - self.state_seen):
                self.col.failures.append(CheckFailure("invariant", pt[0], pt[1], level, m, int(self.inv.state_totals[m]),
                                                      None, f"declared {level} total has no published {level}"))
        chunks, self._chunks = self._chunks, []
        if self.current is not None:
            # a table missing from a chunk (its rows did not fit the layout) is no parent
            names = set.intersection(*(set(c.counts) for c in chunks)) if chunks else set()
            counts = {}
            for n in sorted(names):  # one table at a time, its chunks freed as it is joined
                counts[n] = np.concatenate([c.counts.pop(n) for c in chunks])
            self.parent = LevelTables(level, np.concatenate([np.asarray(c.geoids).astype(str, copy=False) for c in chunks])
                                      if chunks else np.zeros(0, dtype=str), counts)
        else:
            self.parent = None
        self.sums, self.window, self.child_tables = {}, 0, set()

    def _invariant_chunk(self, lt: LevelTables, g: np.ndarray) -> None:
        """The declared totals (``state_totals``: at the level named ``state``, or the top level
        of a geography without one; the level above must add up to them) and the bottom level's
        housing units, against the total lines of the persons and units tables (pl94: P1 line 1,
        H1 line 1)."""
        inv, col, tables = self.inv, self.col, self.ts
        if inv is None:
            return
        tl = self._state_level()
        if inv.state_totals is not None and self.p_total is not None and self.p_total[0] in lt.counts:
            pt, pline = self.p_total
            p1_total = tables.tables[pt].index(pline)
            if lt.level == tl:
                got = lt.counts[pt][:, p1_total]
                want = np.array([int(inv.state_totals.get(x, -1)) for x in g], dtype=np.int64)
                self.state_seen |= set(g.tolist())
                self.state_checked = True
                bad = np.nonzero(want != got)[0]
                if bad.size:
                    col.add("invariant", pt, tl, g, bad, [pline] * bad.size, want[bad], got[bad], f"{tl} total population")
            elif len(self.levels) == 1 and tl in self.tree.levels and g.size:  # the top level, above the states
                nat = int(lt.counts[pt][0, p1_total])
                total = int(sum(int(v) for v in inv.state_totals.values()))
                if nat != total:
                    col.failures.append(CheckFailure("invariant", pt, pline, lt.level, "", total, nat,
                                                     f"{lt.level} total = sum of declared {tl} totals"))
        bottom = self.tree.levels[-1] if self.tree.levels else ""
        if (inv.block_housing_units is not None and self.h_total is not None and lt.level == bottom
                and self.h_total[0] in lt.counts):
            ht, hline = self.h_total
            ig, iv = self.inv_geoids, self.inv_hu
            got = lt.counts[ht][:, tables.tables[ht].index(hline)]
            pos, found = find_units(ig, g)  # (a malformed GEOID: not found, i.e. no declared units)
            self.inv_seen[pos[found]] = True
            want = np.where(found, iv[pos] if len(ig) else 0, 0)  # a published block absent from the invariant has 0
            bad = np.nonzero(want != got)[0]
            if bad.size:
                col.add("invariant", ht, bottom, g, bad, [hline] * bad.size, want[bad], got[bad],
                        f"{bottom} housing units")
            self.h_checked = True

    def failures(self) -> list[CheckFailure]:
        """Every failure found (empty: all checks pass); call once, after the last level."""
        inv = self.inv
        if inv is not None and inv.block_housing_units is not None and self.h_checked:
            assert self.h_total is not None
            ht, hline = self.h_total
            bottom = self.tree.levels[-1]
            absent = np.nonzero(~self.inv_seen & (self.inv_hu != 0))[0]
            if absent.size:
                self.col.add("invariant", ht, bottom, self.inv_geoids, absent, [hline] * absent.size,
                             self.inv_hu[absent], np.zeros(absent.size, np.int64),
                             f"{bottom} with declared housing units is not published")
        return self.col.result()


def run_checks(tables: TableSet, levels: Sequence[LevelTables], digits: "Mapping[str, int] | GeoTree",
               invariants: Invariants | None = None, limit: int = MAX_PER_GROUP) -> list[CheckFailure]:
    """Every consistency check over whole ``levels`` (top to bottom); an empty list means all pass.

    ``digits[level]`` is the GEOID prefix length of a level (``schemas/geolevels.yaml``), or a
    :class:`GeoTree` (a lookup geography's published parent codes).
    Tables missing from a level are skipped (e.g. H1 when no units were published). Each level is
    one chunk of :class:`ReleaseChecks`, which the writer and verifier feed chunk by chunk.
    """
    checks = ReleaseChecks(tables, GeoTree.of(digits, [lt.level for lt in levels]), invariants, limit)
    for i, lt in enumerate(levels):
        checks.begin_level(lt.level, keep=i + 1 < len(levels))
        checks.add(lt)
        checks.end_level()
    return checks.failures()


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
