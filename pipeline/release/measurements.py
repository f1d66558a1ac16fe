"""The published noisy measurements, ``measurements/`` of a release: writer and verifier.

Four files, the big one numeric and the text in three small lookups (a full measurement file
holds every answer of every unit — 2,016 per block for the detailed query — so text per row
made it the slowest part of publishing and verifying a release; ``BENCHMARKS.md``)::

    measurements/noisy_measurements.parquet   run, geolevel, query (dictionary-encoded text),
                                              unit, answer, value: one row per drawn answer
    measurements/queries.parquet              run, geolevel, query, answers, rows, variance,
                                              sigma2: one row per measured (run, level, query)
    measurements/answers.parquet              run, query, answer, answer_label
    measurements/units.parquet                geolevel, unit, geoid: the published units

``unit`` is the area's position in its level's published order (``units.parquet``; the order
of ``tables/``), ``answer`` the answer's index within the query (``answers.parquet``). The
noise variance and σ² are constant per (run, level, query) and live in ``queries.parquet``.

Row order is the draw order (``pipeline.privacy.measure``): runs by name, levels top down, the
run's shards in unit order, then within a shard query by query, units and answers ascending —
so within one (run, level, query) the key ``unit * answers + answer`` strictly increases, which
the verifier checks in one vectorised pass (no duplicate, no reordering).

What may be published: only the measurement contract's columns; every run measurement file is
read through :func:`pipeline.privacy.measure.read_measurement_table`, which refuses a file with
any other column (e.g. a true answer), and only ``unit, query, answer, value`` are copied.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import read_ahead
from pipeline.privacy.measure import MeasurementError, read_measurement_table
from pipeline.release.checks import CheckFailure
from pipeline.release.tree import GeoTree

if TYPE_CHECKING:
    import scipy.sparse as sp

    from pipeline.model.design import Design, Measurement
    from pipeline.model.spec import HistogramSpec
    from pipeline.release.tables import LevelTables

DIR = "measurements"
ROWS_FILE = f"{DIR}/noisy_measurements.parquet"
QUERIES_FILE = f"{DIR}/queries.parquet"
ANSWERS_FILE = f"{DIR}/answers.parquet"
UNITS_FILE = f"{DIR}/units.parquet"
#: every file of a release's measurements (``dptab verify`` requires them all with ``contents.measurements``)
FILES = (ROWS_FILE, QUERIES_FILE, ANSWERS_FILE, UNITS_FILE)

ROWS_SCHEMA = pa.schema([("run", pa.string()), ("geolevel", pa.string()), ("query", pa.string()),
                         ("unit", pa.int32()), ("answer", pa.int32()), ("value", pa.int64())])
# What is written: the text columns as dictionary arrays (each a few distinct values, stored as
# Parquet dictionary pages and run-length indices; no string per row to build or hash). With
# store_schema=False the file declares plain UTF8 columns: every reader sees text (polars would
# otherwise read them as Categorical, which does not join with text), read back as ROWS_SCHEMA.
_TEXT = pa.dictionary(pa.int32(), pa.string())
_WRITE_SCHEMA = pa.schema([("run", _TEXT), ("geolevel", _TEXT), ("query", _TEXT), ("unit", pa.int32()),
                           ("answer", pa.int32()), ("value", pa.int64())])
QUERIES_SCHEMA = pa.schema([("run", pa.string()), ("geolevel", pa.string()), ("query", pa.string()),
                            ("answers", pa.int32()), ("rows", pa.int64()), ("variance", pa.float64()),
                            ("sigma2", pa.string())])
ANSWERS_SCHEMA = pa.schema([("run", pa.string()), ("query", pa.string()), ("answer", pa.int32()),
                            ("answer_label", pa.string())])
UNITS_SCHEMA = pa.schema([("geolevel", pa.string()), ("unit", pa.int32()), ("geoid", pa.string())])
#: each file's columns and Arrow types as read back
SCHEMAS = {ROWS_FILE: ROWS_SCHEMA, QUERIES_FILE: QUERIES_SCHEMA, ANSWERS_FILE: ANSWERS_SCHEMA,
           UNITS_FILE: UNITS_SCHEMA}
_DICT_COLUMNS = ["run", "geolevel", "query"]


class MeasurementPublishError(ValueError):
    """A run measurement file cannot be published (wrong columns, σ², query or unit range)."""


def _frac(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def _groups(design: "Design", specs: Mapping[str, "HistogramSpec"], levels: Sequence[str]) -> list["Measurement"]:
    """The design's measurements in the published order: runs by name, levels top down, queries
    in the spec's order (the writer's and the verifier's design may list them differently)."""
    lorder = {lv: i for i, lv in enumerate(levels)}

    def key(m: "Measurement") -> tuple[str, int, int, str]:
        qorder = list(specs[m.kind].query_defs) if m.kind in specs else []
        return (m.kind, lorder.get(m.level, len(lorder)), qorder.index(m.query) if m.query in qorder else len(qorder),
                m.query)
    return sorted(design.measurements, key=key)


def queries_frame(design: "Design", specs: Mapping[str, "HistogramSpec"], levels: Sequence[str],
                  rows: Mapping[tuple[str, str, str], int]) -> pa.Table:
    """``queries.parquet``: one row per measured (run, level, query) with its answer count, its
    published row count (``rows[(run, level, query)]``, 0 if absent), exact noise variance
    (counts², float) and σ² = 1/ρ as the fraction text ``p/q``."""
    ms = _groups(design, specs, levels)
    return pa.table({
        "run": [m.kind for m in ms], "geolevel": [m.level for m in ms], "query": [m.query for m in ms],
        "answers": pa.array([specs[m.kind].query(m.query).n_answers for m in ms], pa.int32()),
        "rows": pa.array([int(rows.get((m.kind, m.level, m.query), 0)) for m in ms], pa.int64()),
        "variance": pa.array([m.variance for m in ms], pa.float64()),
        "sigma2": [_frac(m.sigma2) for m in ms]}, schema=QUERIES_SCHEMA)


def answers_frame(design: "Design", specs: Mapping[str, "HistogramSpec"]) -> pa.Table:
    """``answers.parquet``: every answer of every measured (run, query) with its label (the
    answer's categories, ``"; "``-joined across the query's attributes), runs by name, queries
    in spec order, answers by index."""
    pairs = sorted({(m.kind, m.query) for m in design.measurements},
                   key=lambda kq: (kq[0], list(specs[kq[0]].query_defs).index(kq[1])))
    run: list[str] = []
    query: list[str] = []
    answer: list[int] = []
    label: list[str] = []
    for kind, q in pairs:
        labels = specs[kind].query(q).answer_labels
        run += [kind] * len(labels)
        query += [q] * len(labels)
        answer += range(len(labels))
        label += ["; ".join(a) for a in labels]
    return pa.table({"run": run, "query": query, "answer": pa.array(answer, pa.int32()), "answer_label": label},
                    schema=ANSWERS_SCHEMA)


def units_frame(levels: Sequence[str], geoids: Sequence[np.ndarray]) -> pa.Table:
    """``units.parquet``: ``geolevel, unit, geoid`` of every published unit, levels top down,
    units in published order (``geoids[i]``: level ``i``'s GEOIDs, ``(n_units,)``)."""
    n = [len(g) for g in geoids]
    return pa.table({"geolevel": pa.array(np.repeat(np.asarray(levels, dtype=object), n), pa.string()),
                     "unit": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n]) if n else [],
                                      pa.int32()),
                     "geoid": pa.array(np.concatenate([np.asarray(g).astype(str) for g in geoids]) if n else [],
                                       pa.string())}, schema=UNITS_SCHEMA)


def _const(text: str, n: int) -> pa.DictionaryArray:
    """``text`` repeated ``n`` times as a dictionary array (no per-row string)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([text], pa.string()))


def write_measurements(root: Path, levels: Sequence[str], geoids: Sequence[np.ndarray], design: "Design",
                       specs: Mapping[str, "HistogramSpec"],
                       files: Mapping[tuple[str, str], Sequence[Path]]) -> list[Path]:
    """Publish the run's measurement files ``files[(kind, level)]`` (shards in unit order) into
    ``root/measurements/`` and return the four files written (none if ``files`` is empty).

    ``levels`` top down with ``geoids[i]`` the published GEOIDs of level ``i`` (units in
    published order); ``design``: the release's privacy design — every file's σ² must be the
    design's (the measurements are the ones the manifest describes). Memory: one shard file's
    numeric columns at a time. Raises :class:`MeasurementPublishError`.
    """
    if not files:
        return []
    out = root / ROWS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {lv: i for i, lv in enumerate(levels)}
    n_units = {lv: len(g) for lv, g in zip(levels, geoids)}
    want = {(m.kind, m.level, m.query): m for m in design.measurements}
    rows: dict[tuple[str, str, str], int] = {}
    # row-group statistics of the key columns only (a reader filtering one run, level, query or
    # unit range skips the other row groups); those of answer and value cost a third of the
    # encoding time and select nothing useful
    with pq.ParquetWriter(out, _WRITE_SCHEMA, compression="zstd", store_schema=False,
                          write_statistics=["run", "geolevel", "query", "unit"]) as writer:
        for (kind, level), paths in sorted(files.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
            if level not in n_units:
                raise MeasurementPublishError(f"measurements of {kind}/{level}: not a level of the geography")
            queries = [q for (k, lv, q) in want if k == kind and lv == level]
            qidx = {q: i for i, q in enumerate(queries)}
            qdict = pa.array(queries, pa.string())
            counts = np.zeros(len(queries), np.int64)
            for p in paths:
                try:
                    t = read_measurement_table(p, ["unit", "query", "answer", "value", "sigma2"])
                except MeasurementError as exc:
                    raise MeasurementPublishError(f"{exc}; refusing to publish it") from None
                unit = t.column("unit").to_numpy()
                if unit.size and (unit.min() < 0 or unit.max() >= n_units[level]):
                    raise MeasurementPublishError(f"{p}: column unit out of range for level {level} "
                                                  f"({n_units[level]} units)")
                # the text columns stay dictionary-encoded as stored: no per-row string is built
                codes = _codes(t.column("query"), t.column("sigma2"), kind, level, want, qidx, p)
                counts += np.bincount(codes, minlength=len(queries))
                n = t.num_rows
                writer.write_table(pa.table({
                    "run": _const(kind, n), "geolevel": _const(level, n),
                    "query": pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), qdict),
                    "unit": pa.array(unit.astype(np.int32)),
                    "answer": t.column("answer").combine_chunks().cast(pa.int32()),
                    "value": t.column("value").combine_chunks().cast(pa.int64())}, schema=_WRITE_SCHEMA))
            rows.update({(kind, level, q): int(c) for q, c in zip(queries, counts)})
    paths_out = [out]
    for rel, table in ((QUERIES_FILE, queries_frame(design, specs, levels, rows)),
                       (ANSWERS_FILE, answers_frame(design, specs)),
                       (UNITS_FILE, units_frame(levels, geoids))):
        pq.write_table(table, root / rel, compression="zstd")
        paths_out.append(root / rel)
    return paths_out


def _codes(query: pa.ChunkedArray, sigma2: pa.ChunkedArray, kind: str, level: str,
           want: Mapping[tuple[str, str, str], "Measurement"], qidx: Mapping[str, int], path: Path) -> np.ndarray:
    """int32 index in ``qidx`` of each row's query, from the dictionary-encoded ``query`` and
    ``sigma2`` columns of one run measurement file, checking on the way that every row's query
    is measured at ``level`` with the design's σ² (the rows are the ones the manifest describes).
    A chunk usually holds one query with one σ² (one dictionary entry each): no per-row work
    but the index lookup."""
    out = []
    for qc, sc in zip(query.chunks, sigma2.chunks):
        qc = qc if isinstance(qc, pa.DictionaryArray) else qc.dictionary_encode()
        sc = sc if isinstance(sc, pa.DictionaryArray) else sc.dictionary_encode()
        qn, sn = qc.dictionary.to_pylist(), sc.dictionary.to_pylist()
        qi = qc.indices.to_numpy(zero_copy_only=False)
        pairs = [(0, 0)] if len(qn) == 1 and len(sn) == 1 else \
            [(int(k) // len(sn), int(k) % len(sn)) for k in
             np.unique(qi.astype(np.int64) * len(sn) + sc.indices.to_numpy(zero_copy_only=False))]
        for a, b in pairs:
            m = want.get((kind, level, qn[a]))
            if m is None or qn[a] not in qidx:
                raise MeasurementPublishError(f"{path}: query {qn[a]!r} is not measured at {level} by the strategy")
            if Fraction(sn[b]) != m.sigma2:
                raise MeasurementPublishError(f"{path}: query {qn[a]!r} drawn with sigma2 {sn[b]}, the release's "
                                              f"design says {_frac(m.sigma2)}; refusing to publish it")
        out.append(np.array([qidx[q] for q in qn], np.int32)[qi])
    return np.concatenate(out) if out else np.zeros(0, np.int32)


# --- verification -------------------------------------------------------------------------


def measurement_checks(root: Path, design: "Design", specs: Mapping[str, "HistogramSpec"],
                       levels: Sequence["LevelTables"], digits: "Mapping[str, int] | GeoTree",
                       published: Mapping[str, Mapping[str, "sp.csr_matrix"]]) -> list[CheckFailure]:
    """The published noisy measurements in ``root/measurements/`` against the design and geography.

    - every file has exactly its columns and types (no other column can slip in);
    - ``queries.parquet`` is exactly the design's (run, level, query) list with each answer
      count, exact variance (float, bitwise) and σ² = 1/ρ, and its ``rows`` are the rows file's;
    - ``answers.parquet`` is every answer of every measured query with the spec's label, and
      ``units.parquet`` every published unit of every level in published order;
    - in ``noisy_measurements.parquet`` every (run, geolevel, query) is measured by the design,
      every ``unit`` a unit of its level and every ``answer`` an answer of its query; within a
      (run, level, query) the key ``unit * answers + answer`` strictly increases (no pair twice,
      rows in draw order); and the pairs are every answer of every unit (a full measurement file)
      or exactly those whose answer in the published parent histogram is positive (answers
      forced to zero are never drawn: ``pipeline.privacy.measure``).

    ``published[kind][level]``: csr int64 ``(n_units, n_cells)`` published histogram (a kind
    absent from it gets only the full-or-subset test); ``levels`` top to bottom. Memory: one row
    group's integer columns and the required keys of its units (the rows are never all held).
    """
    def fail(detail: str, level: str = "") -> CheckFailure:
        return CheckFailure("measurements", "*", None, level, "", detail=detail)

    out: list[CheckFailure] = []
    for rel, schema in SCHEMAS.items():
        path = root / rel
        if not path.is_file():
            out.append(fail(f"{rel} is missing"))
            continue
        got = pq.read_schema(path)
        have = {f.name: _type_name(f.type) for f in got}
        need = {f.name: _type_name(f.type) for f in schema}
        if have != need or got.names != schema.names:
            out.append(fail(f"{rel}: columns {have} differ from {need}"))
    if out:
        return out
    names = [lt.level for lt in levels]
    by_level = {lt.level: lt for lt in levels}
    # the small lookups: each exactly as the design, the specs and the geography make it
    found_q = pl.from_arrow(pq.read_table(root / QUERIES_FILE))
    assert isinstance(found_q, pl.DataFrame)
    rows = {(r["run"], r["geolevel"], r["query"]): r["rows"] for r in found_q.iter_rows(named=True)}
    for rel, want_t in ((QUERIES_FILE, queries_frame(design, specs, names, rows)),
                        (ANSWERS_FILE, answers_frame(design, specs)),
                        (UNITS_FILE, units_frame(names, [lt.geoids for lt in levels]))):
        want_f = pl.from_arrow(want_t)
        found = found_q if rel == QUERIES_FILE else pl.from_arrow(pq.read_table(root / rel))
        assert isinstance(want_f, pl.DataFrame) and isinstance(found, pl.DataFrame)
        if not found.equals(want_f):
            out.append(fail(f"{rel}: {_first_diff(want_f, found)} (expected from the design, the specs and "
                            f"the published geography)"))
    groups = [(m.kind, m.level, m.query) for m in _groups(design, specs, names)]
    gidx = {g: i for i, g in enumerate(groups)}
    tree = GeoTree.of(digits, names)
    expected = _Expected(specs, names, by_level, tree, published)
    scans: dict[int, _GroupScan] = {}
    for i, (kind, level, query) in enumerate(groups):
        if level in by_level:
            n_units, n_answers = len(by_level[level].geoids), specs[kind].query(query).n_answers
            # the keys are compared, as they stream by, with the answers the published parent
            # requires, where queries.parquet says fewer rows than every answer (a level below the
            # top whose parent histogram is in the release; the top level must draw every answer)
            subset = (rows.get((kind, level, query), 0) != n_units * n_answers and names.index(level) > 0
                      and kind in published)
            scans[i] = _GroupScan(n_units, n_answers, expected.keys_of(kind, level, query) if subset else None)
    # The rows, one row group at a time (memory: one row group's integer columns): a group code
    # per row from the dictionary-encoded text, then the runs of equal code (as written, one per
    # shard and query and row group) go to their group's scan as contiguous slices, in file order.
    pf = pq.ParquetFile(root / ROWS_FILE, read_dictionary=_DICT_COLUMNS)
    counts = np.zeros(len(groups), np.int64)
    # (the next row group is read on a reader thread while this one is checked)
    for t in read_ahead(pf.read_row_group(rg, columns=[*_DICT_COLUMNS, "unit", "answer"])
                        for rg in range(pf.num_row_groups)):
        code = np.concatenate([_group_codes(rc, lc, qc, gidx, groups, out, fail)
                               for rc, lc, qc in zip(*(t.column(c).chunks for c in _DICT_COLUMNS))] or
                              [np.zeros(0, np.int32)])
        unit, answer = t.column("unit").to_numpy(), t.column("answer").to_numpy()
        del t
        counts = np.pad(counts, (0, len(groups) - len(counts)))  # groups not measured may have joined
        counts += np.bincount(code, minlength=len(groups))
        change = np.flatnonzero(code[1:] != code[:-1]) + 1
        if change.size > _MAX_RUNS:  # not as written: sorted by group first (stable: file order kept)
            order = np.argsort(code, kind="stable")
            code, unit, answer = code[order], unit[order], answer[order]
            change = np.flatnonzero(code[1:] != code[:-1]) + 1
        for s0, e0 in zip([0, *change.tolist()], [*change.tolist(), code.size]):
            scan = scans.get(int(code[s0])) if e0 > s0 else None
            if scan is not None:
                scan.add(unit[s0:e0], answer[s0:e0])
    for g, i in gidx.items():
        if g in rows and rows[g] != counts[i]:
            out.append(fail(f"{QUERIES_FILE}: {'/'.join(g)} says {rows[g]} rows, {ROWS_FILE} has {counts[i]}", g[1]))
    measured = {(m.kind, m.level, m.query) for m in design.measurements}
    for g, i in gidx.items():
        if g in measured:  # the others are reported above
            out += _group_checks(fail, *g, scans.get(i), rows.get(g), specs, names, by_level, published)
    return out


#: runs of equal (run, level, query) in one row group above which the verifier sorts it by group
#: first (as written there are a handful)
_MAX_RUNS = 1_000


def _group_codes(run_c: pa.DictionaryArray, lv_c: pa.DictionaryArray, q_c: pa.DictionaryArray,
                 gidx: dict[tuple[str, str, str], int], groups: list[tuple[str, str, str]], out: list[CheckFailure],
                 fail: Any) -> np.ndarray:
    """int32 group index (into ``groups``) of each row of one chunk of the three text columns.
    A chunk (a row group as written) is of one run and level and a few queries: each row goes
    through a tiny table over the product of the three dictionaries (no string per row). A
    group the design does not measure is reported (once), appended to ``groups`` and indexed."""
    rd, ld, qd = (c.dictionary.to_pylist() for c in (run_c, lv_c, q_c))
    qi = q_c.indices.to_numpy(zero_copy_only=False)
    if len(rd) == len(ld) == 1:
        key = qi
    else:
        key = (_chunk_codes(run_c) * len(ld) + _chunk_codes(lv_c)) * len(qd) + qi
    present = np.flatnonzero(np.bincount(key, minlength=len(rd) * len(ld) * len(qd))).tolist()
    lut = np.zeros(max(len(rd) * len(ld) * len(qd), 1), np.int32)
    for k in present:
        g = (rd[k // (len(ld) * len(qd))], ld[(k // len(qd)) % len(ld)], qd[k % len(qd)])
        if g not in gidx:
            out.append(fail(f"{ROWS_FILE}: {'/'.join(map(str, g))} has rows but is not measured by the strategy",
                            str(g[1])))
            gidx[g] = len(groups)
            groups.append(g)
        lut[k] = gidx[g]
    return lut[key]


class _Expected:
    """The keys ``unit * answers + answer`` a (run, level, query) must have drawn when answers
    under a published zero are skipped: those whose answer in the published parent histogram is
    positive, for a range of the level's units at a time (sorted int64). Built per group on
    first use: the parent's positive answers (sparse) and each unit's parent position."""

    def __init__(self, specs: Mapping[str, "HistogramSpec"], names: Sequence[str],
                 by_level: Mapping[str, "LevelTables"], tree: GeoTree,
                 published: Mapping[str, Mapping[str, "sp.csr_matrix"]]) -> None:
        self.specs, self.names, self.by_level, self.tree, self.published = specs, names, by_level, tree, published
        self._ppos: dict[str, np.ndarray] = {}

    def _parent_positions(self, level: str) -> np.ndarray:
        if level not in self._ppos:
            parent = self.by_level[self.names[self.names.index(level) - 1]]
            pg = np.asarray(parent.geoids).astype(str)
            ppos, _ = self.tree.parent_positions(parent.level, pg, level,
                                                 np.asarray(self.by_level[level].geoids).astype(str))
            self._ppos[level] = np.minimum(ppos, len(pg) - 1)
        return self._ppos[level]

    def keys_of(self, kind: str, level: str, query: str) -> Callable[[int, int], np.ndarray]:
        """``keys(u0, u1)``: the required keys of units ``u0:u1``."""
        import scipy.sparse as sp

        state: dict[str, Any] = {}

        def keys(u0: int, u1: int) -> np.ndarray:
            if not state:
                q = self.specs[kind].query(query)
                a = sp.csr_matrix((np.ones(len(q.cell_to_answer), np.int64),
                                   (np.arange(len(q.cell_to_answer)), q.cell_to_answer)),
                                  shape=(len(q.cell_to_answer), q.n_answers))
                parent = self.names[self.names.index(level) - 1]
                state.update(positive=(self.published[kind][parent] @ a).tocsr() > 0, n=q.n_answers,
                             ppos=self._parent_positions(level))
            r, c = state["positive"][state["ppos"][u0:u1]].nonzero()
            return np.sort((r.astype(np.int64) + u0) * state["n"] + c)

        return keys


class _GroupScan:
    """The rows of one (run, level, query), seen slice by slice in file order: how many are out
    of range, whether the key ``unit * answers + answer`` strictly increases (first break), and,
    with ``required`` (:meth:`_Expected.keys_of`), how the keys differ from the required ones —
    compared slice by slice as the keys come (both sorted), so memory is one slice, not the
    group's rows (a national file has about a billion)."""

    def __init__(self, n_units: int, n_answers: int,
                 required: Callable[[int, int], np.ndarray] | None) -> None:
        self.n_units, self.n_answers, self.required = n_units, n_answers, required
        self.rows = self.bad = 0
        self.last = -1
        self.broken: tuple[int, int, int] | None = None  # (row within the group, unit, answer)
        self.expected = self.missing = self.extra = 0
        self.first_diff: int | None = None  # the smallest key missing or unexpected

    @property
    def keep(self) -> bool:
        return self.required is not None

    def add(self, unit: np.ndarray, answer: np.ndarray) -> None:
        """One contiguous slice of the group's rows (int32 ``unit``, ``answer``, same length)."""
        bad = int(np.count_nonzero((unit < 0) | (unit >= self.n_units) | (answer < 0) | (answer >= self.n_answers)))
        self.bad += bad
        if not bad and self.broken is None:
            k = unit.astype(np.int64)
            k *= self.n_answers
            k += answer
            if k[0] <= self.last or (k.size > 1 and bool(np.any(k[1:] <= k[:-1]))):
                r = 0 if k[0] <= self.last else int(np.flatnonzero(k[1:] <= k[:-1])[0]) + 1
                self.broken = (self.rows + r, int(unit[r]), int(answer[r]))
            else:
                self._compare(self.last, int(k[-1]), k)
            self.last = int(k[-1])
        self.rows += unit.size

    def _compare(self, after: int, upto: int, k: np.ndarray) -> None:
        """The required keys in ``(after, upto]`` against ``k`` (this slice's keys, all in that range)."""
        if self.required is None:
            return
        want = self.required((after + 1) // self.n_answers, upto // self.n_answers + 1)
        want = want[(want > after) & (want <= upto)]
        self.expected += want.size
        if want.size == k.size and np.array_equal(want, k):
            return
        missing, extra = np.setdiff1d(want, k, assume_unique=True), np.setdiff1d(k, want, assume_unique=True)
        self.missing += missing.size
        self.extra += extra.size
        if self.first_diff is None:
            self.first_diff = int(min(missing[:1].tolist() + extra[:1].tolist()))

    def finish(self, chunk_units: int = 100_000) -> None:
        """The required keys after the last row (units a chunk at a time): all missing."""
        if self.required is None or self.bad or self.broken is not None:
            return
        for u0 in range((self.last + 1) // self.n_answers, self.n_units, chunk_units):
            want = self.required(u0, min(u0 + chunk_units, self.n_units))
            want = want[want > self.last]
            self.expected += want.size
            self.missing += want.size
            if want.size and self.first_diff is None:
                self.first_diff = int(want[0])


def _type_name(t: pa.DataType) -> str:
    """An Arrow type's name, any text encoding as ``string`` (Arrow writers differ in which of
    string, large_string and string_view they declare; the values are the same)."""
    return "string" if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) else str(t)


def _chunk_codes(chunk: pa.Array) -> np.ndarray:
    return chunk.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _group_checks(fail: Any, kind: str, level: str, query: str, scan: "_GroupScan | None", claimed: int | None,
                  specs: Mapping[str, "HistogramSpec"], names: Sequence[str], by_level: Mapping[str, "LevelTables"],
                  published: Mapping[str, Mapping[str, "sp.csr_matrix"]]) -> list[CheckFailure]:
    """One (run, level, query)'s rows (``scan``; ``claimed``: its row count in queries.parquet)
    against its level's units, its query's answers and the answers the run must have drawn."""
    what = f"{kind}/{level}/{query}"
    if level not in by_level or scan is None:
        return [fail(f"{what}: level {level} is not a published geolevel", level)]
    n_units = len(by_level[level].geoids)
    q = specs[kind].query(query)
    if scan.bad:
        return [fail(f"{what}: {scan.bad} row(s) with a unit outside 0..{n_units - 1} or an answer outside "
                     f"0..{q.n_answers - 1}", level)]
    if scan.broken is not None:
        r, u, a = scan.broken
        return [fail(f"{what}: (unit, answer) not strictly increasing at its row {r} (a pair twice, or rows out "
                     f"of draw order): unit {u}, answer {a}", level)]
    full = n_units * q.n_answers
    i = list(names).index(level)
    if scan.rows == full or (i > 0 and kind not in published):
        return []  # every answer drawn (or the parent histogram is not in the release)
    if i == 0:
        return [fail(f"{what}: {scan.rows} rows; the top level draws every answer of every unit ({full})", level)]
    if not scan.keep:
        return [fail(f"{what}: {scan.rows} rows, but queries.parquet says {claimed}, every answer of every unit "
                     f"({full})", level)]
    scan.finish()
    if scan.first_diff is None:
        return []
    parent = names[i - 1]
    if scan.rows == 0:
        return [fail(f"{what} is measured by the strategy but has no rows; the published {parent} answers "
                     f"require {scan.expected}", level)]
    ex = scan.first_diff
    return [fail(f"{what}: {scan.rows} rows, but the published {parent} answers require {scan.expected} (each "
                 f"answer whose parent answer is positive) or {full} (every answer): {scan.missing} missing, "
                 f"{scan.extra} unexpected (first: unit {ex // q.n_answers}, answer {ex % q.n_answers})", level)]


def _first_diff(want: pl.DataFrame, found: pl.DataFrame) -> str:
    """Where two frames of the same schema first differ, readably."""
    if found.height != want.height:
        return f"{found.height} rows, expected {want.height}"
    for c in want.columns:
        bad = np.flatnonzero(~(want[c] == found[c]).fill_null(False).to_numpy())
        if bad.size:
            r = int(bad[0])
            return f"column {c} differs in {bad.size} row(s); first at row {r}: found {found[c][r]!r}, " \
                   f"expected {want[c][r]!r} ({dict(zip(want.columns, want.row(r)))})"
    return "rows differ"
