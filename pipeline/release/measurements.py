"""The published noisy measurements, ``measurements/`` of a release: writer and verifier.

A partitioned dataset of the run's own measurement files and three small text lookups::

    measurements/noisy/run=<run>/geolevel=<level>/shard-NNNNN.parquet
                                  the run's measurement shard files, byte for byte: unit, query,
                                  answer, value, variance, sigma2 (the measurement contract,
                                  ``docs/contracts.md``), one row per drawn answer; the run and
                                  level are the (hive-style) directory names
    measurements/queries.parquet  run, geolevel, query, answers, rows, variance, sigma2: one row
                                  per measured (run, level, query)
    measurements/answers.parquet  run, query, answer, answer_label
    measurements/units.parquet    geolevel, unit, geoid: the published units

Publishing copies the files the measure steps wrote (already Parquet, dictionary-encoded text,
statistics on ``unit``, the layout of their row groups) instead of re-encoding tens of millions of rows into one
file: that re-encoding was most of what the full estimator's release cost beyond TopDown's
(``BENCHMARKS.md``), and a national file would be one unsplittable object. ``pl.scan_parquet(
"measurements/noisy/**/*.parquet", hive_partitioning=True)`` or any Arrow dataset reader sees
one table with ``run`` and ``geolevel`` columns.

``unit`` is the area's position in its level's published order (``units.parquet``; the order
of ``tables/``), ``answer`` the answer's index within the query (``answers.parquet``). Every
row carries its query's exact noise variance and σ², which ``queries.parquet`` also lists.

Row order is the draw order (``pipeline.privacy.measure``): within a part, query by query,
units and answers ascending; a level's parts (shards) in unit order — so within one (run,
level, query), reading the parts in shard order, the key ``unit * answers + answer`` strictly
increases, which the verifier checks in one vectorised pass (no duplicate, no reordering).

What may be published: only the measurement contract's columns and key-value metadata. Every
run file is checked by :func:`pipeline.privacy.measure.check_measurement_columns`, which
refuses a file with any other column (e.g. a true answer), and its metadata (level, queries,
σ²) before it is copied; the verifier
checks each part's columns, metadata, σ² and variance row by row.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import ROW_GROUP_ROWS, RowGroups, copy_file_sha256, read_ahead
from pipeline.privacy.measure import SCHEMA as PART_SCHEMA
from pipeline.privacy.measure import MeasurementError, check_measurement_columns, layout_labels
from pipeline.release.checks import CheckFailure
from pipeline.release.tree import GeoTree

if TYPE_CHECKING:
    import scipy.sparse as sp

    from pipeline.model.design import Design, Measurement
    from pipeline.model.spec import HistogramSpec
    from pipeline.release.tables import LevelTables

DIR = "measurements"
#: the partitioned dataset of noisy measurement rows
NOISY_DIR = f"{DIR}/noisy"
QUERIES_FILE = f"{DIR}/queries.parquet"
ANSWERS_FILE = f"{DIR}/answers.parquet"
UNITS_FILE = f"{DIR}/units.parquet"
#: the fixed files of a release's measurements (``dptab verify`` requires them all with
#: ``contents.measurements``; the parts under :data:`NOISY_DIR` are whatever the run's shards were)
FILES = (QUERIES_FILE, ANSWERS_FILE, UNITS_FILE)
_PART = re.compile(r"^measurements/noisy/run=([A-Za-z0-9_]+)/geolevel=([A-Za-z0-9_]+)/shard-(\d{5,})\.parquet$")
#: the key-value metadata a part may carry (``pipeline.privacy.measure``: what was measured)
PART_METADATA = frozenset({"dptab.level", "dptab.units", "dptab.full", "dptab.strategy", "dptab.queries",
                           "dptab.layout"})

QUERIES_SCHEMA = pa.schema([("run", pa.string()), ("geolevel", pa.string()), ("query", pa.string()),
                            ("answers", pa.int32()), ("rows", pa.int64()), ("variance", pa.float64()),
                            ("sigma2", pa.string())])
ANSWERS_SCHEMA = pa.schema([("run", pa.string()), ("query", pa.string()), ("answer", pa.int32()),
                            ("answer_label", pa.string())])
# unit int64 as in the parts, so the two join without a cast
UNITS_SCHEMA = pa.schema([("geolevel", pa.string()), ("unit", pa.int64()), ("geoid", pa.string())])
#: each fixed file's columns and Arrow types as read back
SCHEMAS = {QUERIES_FILE: QUERIES_SCHEMA, ANSWERS_FILE: ANSWERS_SCHEMA, UNITS_FILE: UNITS_SCHEMA}


def part_path(kind: str, level: str, shard_file: str) -> str:
    """The release path of one run measurement shard file (``shard-NNNNN.parquet``)."""
    return f"{NOISY_DIR}/run={kind}/geolevel={level}/{shard_file}"


def is_part(rel: str) -> bool:
    """Whether a release path is a noisy measurement part."""
    return _PART.match(rel) is not None


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


def units_rows(levels: Sequence[str], geoids: Sequence[np.ndarray], start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` of ``units.parquet``: ``geolevel, unit, geoid`` of every published
    unit, levels top down, units in published order (``geoids[i]``: level ``i``'s GEOIDs,
    ``(n_units,)``). Made a range at a time, so that neither the writer nor the verifier holds
    the nation's units as one table (~250 MB at 100 M persons)."""
    bounds = np.cumsum([0] + [len(g) for g in geoids])
    parts = []
    for k, level in enumerate(levels):
        lo, hi = max(start, int(bounds[k])), min(stop, int(bounds[k + 1]))
        if lo >= hi:
            continue
        a, b = lo - int(bounds[k]), hi - int(bounds[k])
        parts.append(pa.table({"geolevel": pa.repeat(pa.scalar(level, pa.string()), b - a),
                               "unit": pa.array(np.arange(a, b, dtype=np.int64), pa.int64()),
                               "geoid": pa.array(np.asarray(geoids[k][a:b]).astype(str, copy=False), pa.string())},
                              schema=UNITS_SCHEMA))
    return pa.concat_tables(parts) if parts else UNITS_SCHEMA.empty_table()


def _write_units(path: Path, levels: Sequence[str], geoids: Sequence[np.ndarray]) -> None:
    """``units.parquet`` (:func:`units_rows`), a row group at a time: the bytes ``pq.write_table``
    of the whole table gives."""
    total = sum(len(g) for g in geoids)
    groups = RowGroups(path, schema=UNITS_SCHEMA)
    for s in range(0, total, ROW_GROUP_ROWS):
        groups.add(units_rows(levels, geoids, s, min(s + ROW_GROUP_ROWS, total)))
    groups.close()


def _units_problem(path: Path, levels: Sequence[str], geoids: Sequence[np.ndarray]) -> str | None:
    """How ``units.parquet`` differs from :func:`units_rows` (``None``: it does not), compared a
    row group at a time."""
    pf = pq.ParquetFile(path)
    total = sum(len(g) for g in geoids)
    if pf.metadata.num_rows != total:
        return f"{pf.metadata.num_rows} rows, expected {total}"
    at = 0
    for i in range(pf.num_row_groups):
        found = pl.from_arrow(pf.read_row_group(i))
        assert isinstance(found, pl.DataFrame)
        want = pl.from_arrow(units_rows(levels, geoids, at, at + found.height))
        assert isinstance(want, pl.DataFrame)
        if not found.equals(want):
            return _first_diff(want, found, at)
        at += found.height
    return None


def write_measurements(root: Path, levels: Sequence[str], geoids: Sequence[np.ndarray], design: "Design",
                       specs: Mapping[str, "HistogramSpec"], files: Mapping[tuple[str, str], Sequence[Path]],
                       copy: Callable[[Path, Path], str] | None = None) -> dict[Path, str | None]:
    """Publish the run's measurement files ``files[(kind, level)]`` (shards in unit order) into
    ``root/measurements/`` and return the files written (none if ``files`` is empty), each with
    the sha256 of its bytes where it was made here: each shard file copied byte for byte to
    :func:`part_path` (hashed as it is copied), then the three lookups (``None``).

    ``copy(src, dst)`` (default :func:`~pipeline.files.copy_file_sha256`) copies a shard and
    returns the sha256 of the bytes copied, raising if ``src`` is not a file to publish (the job
    passes ``RunDir.copy_verified``, which compares that digest with the run's record of the
    file its stage wrote: the bytes are read once, not once to check and again to copy); the
    columns and metadata are checked after it.

    ``levels`` top down with ``geoids[i]`` the published GEOIDs of level ``i`` (units in
    published order); ``design``: the release's privacy design — every row's σ² must be the
    design's (the measurements are the ones the manifest describes). Each file is checked to
    hold exactly the measurement columns and metadata of its level with the design's queries, σ²
    and variances (:func:`part_metadata_problem`); its rows per query come from its recorded
    layout (:func:`_query_counts`). Every row's query, σ², variance, unit and answer is the
    verifier's (:func:`measurement_checks`, which the release writer runs before anything is
    published). Raises :class:`MeasurementPublishError`.
    """
    if not files:
        return {}
    order = {lv: i for i, lv in enumerate(levels)}
    want = {(m.kind, m.level, m.query): m for m in design.measurements}
    rows: dict[tuple[str, str, str], int] = {}
    paths_out: dict[Path, str | None] = {}
    for (kind, level), paths in sorted(files.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        if level not in order:
            raise MeasurementPublishError(f"measurements of {kind}/{level}: not a level of the geography")
        queries = [q for (k, lv, q) in want if k == kind and lv == level]
        qidx = {q: i for i, q in enumerate(queries)}
        counts = np.zeros(len(queries), np.int64)
        for p in paths:
            p = Path(p)
            rel = part_path(kind, level, p.name)
            if not is_part(rel):
                raise MeasurementPublishError(f"{p}: a measurement shard file is named shard-NNNNN.parquet")
            out = root / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            # copied first: the copy is the check that these are the run's bytes (``copy``
            # raises otherwise) before anything is read of them
            digest = (copy or copy_file_sha256)(p, out)
            try:
                check_measurement_columns(p)
            except MeasurementError as exc:
                raise MeasurementPublishError(f"{exc}; refusing to publish it") from None
            counts += _query_counts(p, kind, level, want, qidx)
            paths_out[out] = digest
        rows.update({(kind, level, q): int(c) for q, c in zip(queries, counts)})
    for rel, table in ((QUERIES_FILE, queries_frame(design, specs, levels, rows)),
                       (ANSWERS_FILE, answers_frame(design, specs))):
        pq.write_table(table, root / rel, compression="zstd")
        paths_out[root / rel] = None
    _write_units(root / UNITS_FILE, levels, geoids)
    paths_out[root / UNITS_FILE] = None
    return paths_out


def part_metadata_problem(raw: Mapping[bytes, bytes] | None, level: str, want: Mapping[str, "Measurement"]
                          ) -> tuple[str | None, tuple[int, int]]:
    """What is wrong with a measurement file's key-value metadata (``None`` if nothing), and the
    unit range it declares: only the measurement keys (:data:`PART_METADATA`), of ``level``, and
    exactly the design's queries there (``want``: query -> Measurement), each with the design's
    σ² and variance. The writer refuses such a file; the verifier reports such a part."""
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (raw or {}).items()}
    try:
        listed = {q: (s2, var) for q, s2, var in json.loads(meta["dptab.queries"])}
        u0, u1 = (int(x) for x in meta["dptab.units"].split(":"))
        have = meta["dptab.level"]
    except (KeyError, ValueError, TypeError) as exc:
        return f"unreadable measurement metadata ({type(exc).__name__}: {exc})", (0, 0)
    extra = sorted(set(meta) - PART_METADATA)
    if extra:
        return f"metadata {extra} beyond the measurement metadata", (u0, u1)
    if have != level:
        return f"a measurement file of level {have!r}, published as {level}", (u0, u1)
    if set(listed) != set(want):
        return f"queries {sorted(listed)} in its metadata, the design measures {sorted(want)} at {level}", (u0, u1)
    for q, m in want.items():
        if listed[q] != (_frac(m.sigma2), m.variance):
            return (f"query {q!r} drawn with sigma2 {listed[q][0]} (variance {listed[q][1]}), the release's design "
                    f"says {_frac(m.sigma2)} ({m.variance})"), (u0, u1)
    return None, (u0, u1)


def _query_counts(path: Path, kind: str, level: str, want: Mapping[tuple[str, str, str], "Measurement"],
                  qidx: Mapping[str, int]) -> np.ndarray:
    """Rows per query (int64, indexed by ``qidx``) of one run measurement file of ``kind`` at
    ``level``, after checking its metadata: of this level, every query measured there by the
    design with the design's σ². A row group's query comes from the file's recorded layout
    (:func:`~pipeline.privacy.measure.layout_labels`: ``measure_shard`` writes one query per row
    group and records which; no row is read), else from its statistics where they name one of
    the level's queries, else from its dictionary-encoded query and σ² columns (checked against
    the design). The verifier, run before anything is published, checks every row's query, σ²
    and variance and that these counts are the parts' (so a layout or statistics that lied
    would stop the release)."""
    pf = pq.ParquetFile(path, read_dictionary=["query", "sigma2"])
    md = pf.metadata
    why, _ = part_metadata_problem(md.metadata, level, {q: want[(kind, level, q)] for q in qidx})
    if why is not None:
        raise MeasurementPublishError(f"{path}: {why}; refusing to publish it")
    col = {md.schema.column(j).name: j for j in range(md.num_columns)}
    counts = np.zeros(len(qidx), np.int64)
    named = layout_labels(md, set(qidx))
    if named is not None:
        for g, (q, _) in enumerate(named):
            counts[qidx[q]] += md.row_group(g).num_rows
        return counts
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        st = rg.column(col["query"]).statistics
        label = st.min if st is not None and st.has_min_max and st.min == st.max else None
        if isinstance(label, str) and label in qidx:
            counts[qidx[label]] += rg.num_rows
            continue
        t = pf.read_row_group(g, columns=["query", "sigma2"])
        counts += np.bincount(_codes(t.column("query"), t.column("sigma2"), kind, level, want, qidx, path),
                              minlength=len(qidx))
    return counts


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


def subset_runs(root: Path, specs: Mapping[str, "HistogramSpec"], levels: Sequence["LevelTables"]) -> set[str]:
    """The runs of ``root/measurements/queries.parquet`` with a (level, query) below the top
    level measured on fewer rows than every answer of every unit (topdown skips the answers a
    published parent makes zero): only those need the published parent supports that
    :func:`measurement_checks` compares such rows with (reading them costs a pass over the
    microdata). A row naming an unknown run or query counts as such a run, so nothing the checks
    would compare is skipped; an unreadable file gives every run (the checks report it)."""
    names = [lt.level for lt in levels]
    units = {lt.level: len(lt.geoids) for lt in levels}
    try:
        found = pq.read_table(root / QUERIES_FILE, columns=["run", "geolevel", "query", "rows"]).to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return set(specs)
    out = set()
    for r in found:
        run, level, query, rows = r["run"], r["geolevel"], r["query"], r["rows"]
        if level not in units or names.index(level) == 0:
            continue
        try:
            full = units[level] * specs[run].query(query).n_answers
        except (KeyError, ValueError):
            out.add(str(run))
            continue
        if rows != full:
            out.add(str(run))
    return out


def measurement_checks(root: Path, design: "Design", specs: Mapping[str, "HistogramSpec"],
                       levels: Sequence["LevelTables"], digits: "Mapping[str, int] | GeoTree",
                       published: Mapping[str, Mapping[str, "sp.csr_matrix"]]) -> list[CheckFailure]:
    """The published noisy measurements in ``root/measurements/`` against the design and geography.

    - every file has exactly its columns and types (no other column can slip in), every part
      is named ``noisy/run=<run>/geolevel=<published level>/shard-NNNNN.parquet`` and carries only
      the measurement metadata, of its own level, listing the design's queries there with their
      σ² and variance;
    - ``queries.parquet`` is exactly the design's (run, level, query) list with each answer
      count, exact variance (float, bitwise) and σ² = 1/ρ, and its ``rows`` are the parts';
    - ``answers.parquet`` is every answer of every measured query with the spec's label, and
      ``units.parquet`` every published unit of every level in published order;
    - in the parts every (run, geolevel, query) is measured by the design with its σ² and
      variance on every row, every ``unit`` is a unit of its level within the part's declared
      unit range and every ``answer`` an answer of its query; within a (run, level, query), parts
      in shard order, the key ``unit * answers + answer`` strictly increases (no pair twice, rows
      in draw order); and the pairs are every answer of every unit (a full measurement) or
      exactly those whose answer in the published parent histogram is positive (answers forced
      to zero are never drawn: ``pipeline.privacy.measure``).

    ``published[kind][level]``: csr ``(n_units, n_cells)``, the published histogram of every
    level above the bottom one, or any matrix positive exactly where it is (only which answers
    are positive is read; a kind absent from it gets only the full-or-subset test); ``levels``
    top to bottom. Memory: one row
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
        if not _same_columns(got, schema):
            out.append(fail(f"{rel}: columns {_columns_of(got)} differ from {_columns_of(schema)}"))
    names = [lt.level for lt in levels]
    parts = _parts(root, names, design, out, fail)
    if out:
        return out
    by_level = {lt.level: lt for lt in levels}
    # the small lookups: each exactly as the design, the specs and the geography make it
    found_q = pl.from_arrow(pq.read_table(root / QUERIES_FILE))
    assert isinstance(found_q, pl.DataFrame)
    rows = {(r["run"], r["geolevel"], r["query"]): r["rows"] for r in found_q.iter_rows(named=True)}
    expected_from = "(expected from the design, the specs and the published geography)"
    for rel, want_t in ((QUERIES_FILE, queries_frame(design, specs, names, rows)),
                        (ANSWERS_FILE, answers_frame(design, specs))):
        want_f = pl.from_arrow(want_t)
        found = found_q if rel == QUERIES_FILE else pl.from_arrow(pq.read_table(root / rel))
        assert isinstance(want_f, pl.DataFrame) and isinstance(found, pl.DataFrame)
        if not found.equals(want_f):
            out.append(fail(f"{rel}: {_first_diff(want_f, found)} {expected_from}"))
    units_problem = _units_problem(root / UNITS_FILE, names, [lt.geoids for lt in levels])
    if units_problem is not None:
        out.append(fail(f"{UNITS_FILE}: {units_problem} {expected_from}"))
    ms = _groups(design, specs, names)
    groups = [(m.kind, m.level, m.query) for m in ms]
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
    counts = np.zeros(len(groups), np.int64)
    # per group: the design's variance (bitwise) and σ² text every row must carry
    variance = [m.variance for m in ms]
    sigma2 = [_frac(m.sigma2) for m in ms]
    misstated: set[int] = set()
    for kind, level, rel, (u0, u1) in parts:
        pf = pq.ParquetFile(root / rel, read_dictionary=["query", "sigma2"])
        outside = 0
        # The rows, one row group at a time (memory: one row group's integer columns; the next is
        # read on a reader thread while this one is checked). A row group as written (one query,
        # one σ² text) goes to its group's scan whole; any other gets a group code per row from
        # the dictionary-encoded query, and the runs of equal code go to their group's scan as
        # contiguous slices, in file order.
        for t in read_ahead(pf.read_row_group(rg, columns=["query", "sigma2", "variance", "unit", "answer"])
                            for rg in range(pf.num_row_groups)):
            unit, answer = t.column("unit").to_numpy(), t.column("answer").to_numpy()
            span = (int(unit.min()), int(unit.max())) if unit.size else None
            if span is not None and (span[0] < u0 or span[1] >= u1):
                outside += int(np.count_nonzero((unit < u0) | (unit >= u1)))
            one = _one_group(kind, level, t, gidx)
            if one is not None:  # as written: one query, one σ² text in the row group
                g, s2_text = one
                if s2_text != sigma2[g] or bool(np.any(t.column("variance").to_numpy() != variance[g])):
                    misstated.add(g)
                counts[g] += unit.size
                scan = scans.get(g)
                if scan is not None and unit.size:
                    scan.add(unit, answer, span)
                continue
            code = np.concatenate([_query_codes(kind, level, qc, gidx, groups, rel, out, fail)
                                   for qc in t.column("query").chunks] or [np.zeros(0, np.int32)])
            variance += [float("nan")] * (len(groups) - len(variance))  # groups not measured may have joined
            sigma2 += [""] * (len(groups) - len(sigma2))
            misstated |= _misstated(code, t.column("sigma2"), t.column("variance"), sigma2, variance)
            del t
            counts = np.pad(counts, (0, len(groups) - len(counts)))
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
        if outside:
            out.append(fail(f"{rel}: {outside} row(s) with a unit outside the part's units {u0}:{u1}", level))
    for i in sorted(misstated):
        if i < len(ms):
            out.append(fail(f"{'/'.join(groups[i])}: rows whose variance or sigma2 is not the design's "
                            f"({variance[i]!r}, {sigma2[i]})", groups[i][1]))
    for g, i in gidx.items():
        if g in rows and rows[g] != counts[i]:
            out.append(fail(f"{QUERIES_FILE}: {'/'.join(g)} says {rows[g]} rows, the parts have {counts[i]}", g[1]))
    measured = {(m.kind, m.level, m.query) for m in design.measurements}
    for g, i in gidx.items():
        if g in measured:  # the others are reported above
            out += _group_checks(fail, *g, scans.get(i), rows.get(g), specs, names, by_level, published)
    return out


#: runs of equal (run, level, query) in one row group above which the verifier sorts it by group
#: first (as written there is one)
_MAX_RUNS = 1_000


def _columns_of(schema: pa.Schema) -> dict[str, str]:
    return {f.name: _type_name(f.type) for f in schema}


def _same_columns(got: pa.Schema, want: pa.Schema) -> bool:
    return _columns_of(got) == _columns_of(want) and got.names == want.names


def _parts(root: Path, names: Sequence[str], design: "Design", out: list[CheckFailure], fail: Any
           ) -> list[tuple[str, str, str, tuple[int, int]]]:
    """The parts under ``measurements/noisy/`` as ``(run, level, release path, (first unit, end
    unit))`` in reading order (runs by name, levels top down, shards ascending), after checking
    each one's name, columns and key-value metadata (failures appended to ``out``)."""
    found = []
    base = root / NOISY_DIR
    for p in sorted(base.rglob("*")) if base.is_dir() else []:
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        m = _PART.match(rel)
        if m is None or m.group(2) not in names:
            out.append(fail(f"{rel}: not a part of the noisy measurements (noisy/run=<run>/geolevel=<published "
                            f"level>/shard-NNNNN.parquet)"))
            continue
        kind, level = m.group(1), m.group(2)
        got = pq.read_schema(p)
        if not _same_columns(got, PART_SCHEMA):
            out.append(fail(f"{rel}: columns {_columns_of(got)} differ from {_columns_of(PART_SCHEMA)}", level))
            continue
        want = {m.query: m for m in design.measurements if m.kind == kind and m.level == level}
        why, (u0, u1) = part_metadata_problem(pq.read_metadata(p).metadata, level, want)
        if why is not None:
            out.append(fail(f"{rel}: {why}", level))
            continue
        found.append(((kind, names.index(level), int(m.group(3))), (kind, level, rel, (u0, u1))))
    return [item for _, item in sorted(found)]


def _one_group(kind: str, level: str, t: pa.Table, gidx: Mapping[tuple[str, str, str], int]
               ) -> tuple[int, str] | None:
    """``(group index, σ² text)`` when every row of the row group ``t`` is of one measured
    (run, level, query) with one σ² text — as :func:`pipeline.privacy.measure.measure_shard`
    writes a row group: each text column's every chunk a one-entry dictionary, no null, every
    index 0 (read from the dictionaries, with no value per row to look up). ``None`` otherwise:
    the row group is then checked row by row (codes through :func:`_query_codes`)."""
    texts = []
    for name in ("query", "sigma2"):
        seen = set()
        for c in t.column(name).chunks:
            if not isinstance(c, pa.DictionaryArray) or len(c.dictionary) != 1 or c.null_count:
                return None
            idx = c.indices.to_numpy(zero_copy_only=False)
            if idx.size and bool(idx.any()):  # an index other than 0 (one pass, not min and max)
                return None
            seen.add(c.dictionary[0].as_py())
        if len(seen) != 1:
            return None
        texts.append(seen.pop())
    g = gidx.get((kind, level, texts[0]))
    return None if g is None else (g, texts[1])


def _query_codes(kind: str, level: str, q_c: pa.DictionaryArray, gidx: dict[tuple[str, str, str], int],
                 groups: list[tuple[str, str, str]], rel: str, out: list[CheckFailure], fail: Any) -> np.ndarray:
    """int32 group index (into ``groups``) of each row of one chunk of a part's query column,
    through a tiny table over its dictionary (no string per row). A group the design does not
    measure is reported (once), appended to ``groups`` and indexed."""
    qd = q_c.dictionary.to_pylist()
    lut = np.zeros(max(len(qd), 1), np.int32)
    qi = q_c.indices.to_numpy(zero_copy_only=False)
    for k in np.flatnonzero(np.bincount(qi, minlength=len(qd))).tolist():
        g = (kind, level, qd[k])
        if g not in gidx:
            out.append(fail(f"{rel}: {'/'.join(map(str, g))} has rows but is not measured by the strategy", level))
            gidx[g] = len(groups)
            groups.append(g)
        lut[k] = gidx[g]
    return lut[qi]


def _misstated(code: np.ndarray, sigma2: pa.ChunkedArray, variance: pa.ChunkedArray, want_s2: Sequence[str],
               want_var: Sequence[float]) -> set[int]:
    """The groups (codes) with a row whose σ² text or variance (bitwise) is not the design's
    (``want_s2[code]``, ``want_var[code]``). σ² through each chunk's dictionary: one comparison
    per (group, σ² text) pair present, none per row."""
    bad_rows = variance.to_numpy() != np.asarray(want_var, np.float64)[code]
    out = set(np.unique(code[bad_rows]).tolist())
    at = 0
    for c in sigma2.chunks:
        c = c if isinstance(c, pa.DictionaryArray) else c.dictionary_encode()
        sd = c.dictionary.to_pylist()
        part = code[at:at + len(c)]
        at += len(c)
        key = part.astype(np.int64) * max(len(sd), 1) + c.indices.to_numpy(zero_copy_only=False)
        for k in np.flatnonzero(np.bincount(key)).tolist():
            g, j = divmod(k, max(len(sd), 1))
            if sd[j] != want_s2[g]:
                out.add(g)
    return out


class _Expected:
    """The keys ``unit * answers + answer`` a (run, level, query) must have drawn when answers
    under a published zero are skipped: those whose answer in the published parent histogram is
    positive, for a range of the level's units at a time (sorted int64), made from the parents'
    rows of that range alone (their histogram rows times the query's cell-to-answer matrix) — so
    no parent level's answers are held per query (all of them at once took the check to ~2.2 GB
    for the US). Per level, each unit's parent position is kept (int64, one per unit)."""

    def __init__(self, specs: Mapping[str, "HistogramSpec"], names: Sequence[str],
                 by_level: Mapping[str, "LevelTables"], tree: GeoTree,
                 published: Mapping[str, Mapping[str, "sp.csr_matrix"]]) -> None:
        self.specs, self.names, self.by_level, self.tree, self.published = specs, names, by_level, tree, published
        self._ppos: dict[str, np.ndarray] = {}

    def _parent_positions(self, level: str) -> np.ndarray:
        if level not in self._ppos:
            parent = self.by_level[self.names[self.names.index(level) - 1]]
            pg = np.asarray(parent.geoids).astype(str, copy=False)
            # (the blocks: CodedGeoids, whose strings parent_positions makes a range at a time)
            ppos, _ = self.tree.parent_positions(parent.level, pg, level, self.by_level[level].geoids)
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
                state.update(a=a, n=q.n_answers, ppos=self._parent_positions(level),
                             parent=self.published[kind][self.names[self.names.index(level) - 1]])
            pp = state["ppos"][u0:u1]
            if not pp.size:
                return np.zeros(0, np.int64)
            p0, p1 = int(pp.min()), int(pp.max()) + 1  # the parents of the range (consecutive: units in order)
            positive = (state["parent"][p0:p1] @ state["a"]).tocsr() > 0
            r, c = positive[pp - p0].nonzero()
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

    def add(self, unit: np.ndarray, answer: np.ndarray, span: tuple[int, int] | None = None) -> None:
        """One contiguous slice of the group's rows (integer ``unit``, ``answer``, same length);
        ``span``: ``(unit.min(), unit.max())`` when the caller has them."""
        bad = 0
        if unit.size and span is None:
            span = int(unit.min()), int(unit.max())
        if unit.size and (span[0] < 0 or span[1] >= self.n_units or int(answer.min()) < 0
                          or int(answer.max()) >= self.n_answers):  # reductions, no mask, when all is well
            bad = int(np.count_nonzero((unit < 0) | (unit >= self.n_units) | (answer < 0) | (answer >= self.n_answers)))
        self.bad += bad
        if not bad and self.broken is None:
            k = np.multiply(unit, self.n_answers, dtype=np.int64)  # one pass: the product is the copy
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


def _first_diff(want: pl.DataFrame, found: pl.DataFrame, offset: int | None = None) -> str:
    """Where two frames of the same schema first differ, readably; with ``offset`` the frames
    are the file's rows from ``offset`` on (one row group), and rows are numbered in the file."""
    if found.height != want.height:
        return f"{found.height} rows, expected {want.height}"
    at = offset or 0
    for c in want.columns:
        bad = np.flatnonzero(~(want[c] == found[c]).fill_null(False).to_numpy())
        if bad.size:
            r = int(bad[0])
            where = "" if offset is None else f" of rows {at}..{at + want.height - 1}"
            return f"column {c} differs in {bad.size} row(s){where}; first at row {at + r}: found {found[c][r]!r}, " \
                   f"expected {want[c][r]!r} ({dict(zip(want.columns, want.row(r)))})"
    return "rows differ"
