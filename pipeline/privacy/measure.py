"""Noisy measurements of one level's queries for a range of units, written once as Parquet.

For units ``start:stop`` of a level and every query the strategy measures there, each answer
gets true answer + exact discrete Gaussian noise with σ² = 1/ρ_q (``pipeline.privacy``). The
file (contract in ``docs/contracts.md``: ``unit, query, answer, value, variance, sigma2``) is
written once: to a temporary file in the same directory, then hard-linked into place, which
fails if the file exists — an existing file for the same release, level and shard is reused and
never overwritten, so no retry can draw fresh noise for measurements already taken.

Skipping answers whose parent answer is zero (``full=False`` with a ``parent``): post-processing
gives every child variables only on the cells where its (already published, integer) parent is
positive. If the parent's answer ``a`` of query ``q`` is zero, every parent cell that maps to
``a`` is zero, so every child cell that maps to ``a`` is forced to zero and the child's answer
``a`` is 0 whatever was measured. The post-processed output is therefore a function of the other
measurements only, and each of those is still true answer + independent N_Z(0, σ²_q) noise, so
the output distribution is exactly the same as with every answer drawn. Skipped answers are
absent from the file (not drawn at all). ``full=True`` draws every answer, for a complete noisy
measurement file; the privacy cost is the same either way (it is accounted per query).

Draw order, for keyed reproducibility: queries in strategy order, then units, then answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DptabError
from pipeline.files import repeated_text
from pipeline.model.design import discrete_gaussian_variance
from pipeline.model.geography import sum_children
from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import HistogramSpec
from pipeline.model.strategy import Strategy
from pipeline.privacy.randomness import RandomSource, resolve_source
from pipeline.privacy.samplers import discrete_gaussian

COLUMNS = ("unit", "query", "answer", "value", "variance", "sigma2")
SCHEMA = pa.schema([("unit", pa.int64()), ("query", pa.string()), ("answer", pa.int32()),
                    ("value", pa.int64()), ("variance", pa.float64()), ("sigma2", pa.string())])
# What is written: the two constant text columns as dictionary arrays with int8 indices (no
# per-row strings to build or hash, and the narrowest indices to scan); with store_schema=False
# the file holds plain UTF8 columns, read back as SCHEMA. Every column is required (no value is
# ever null): no definition levels to compute and write, a fifth of the encoding time.
_WRITE_SCHEMA = pa.schema([pa.field(name, typ, nullable=False) for name, typ in (
    ("unit", pa.int64()), ("query", pa.dictionary(pa.int8(), pa.string())), ("answer", pa.int32()),
    ("value", pa.int64()), ("variance", pa.float64()), ("sigma2", pa.dictionary(pa.int8(), pa.string())))])
#: the non-dictionary columns' encodings (encodings every Parquet reader knows)
_ENCODING = {"unit": "PLAIN", "answer": "DELTA_BINARY_PACKED", "variance": "PLAIN"}
#: per column: zstd where it pays (the plain units and variances, the answers' deltas); the
#: values' bit-packed dictionary indices are noise zstd cannot shrink (measured: 219 → 231 kB a
#: row group without it) and the two texts are one run each — compressing them only costs time
_COMPRESSION = {"unit": "zstd", "query": "none", "answer": "zstd", "value": "none", "variance": "zstd",
                "sigma2": "none"}
#: answers per noise batch (bounds memory: ~40 bytes per answer)
BATCH_ANSWERS = 1 << 22
#: file metadata key of a measurement file's layout, written by :func:`measure_shard`: JSON
#: ``{"queries": [[query, rows], ...] (in file order), "row_groups": [rows, ...]}``. With it the
#: loader names each row group's query without statistics, and reads only the ``value`` column of
#: a query that holds every answer of the file's units (``_complete_runs``)
LAYOUT_KEY = b"dptab.layout"
#: rows per Parquet row group of a measurement file: the loader reads only the row groups of the
#: units it asks for (``_query_rows``), so a group spans ~130 blocks of the detailed query, not ~500
ROW_GROUP_ROWS = 1 << 18


class MeasurementError(DptabError, ValueError):
    """A measurement request is inconsistent, or an existing file does not match it."""


@dataclass(frozen=True)
class MeasureResult:
    """What :func:`measure_shard` did: ``drawn`` is False when an existing file was reused."""

    path: Path
    rows: int
    drawn: bool
    skipped: int


@dataclass(frozen=True)
class QueryMeasurements:
    """One query's measurements over a unit range: ``values`` float64 ``(n_units, n_answers)``
    (NaN where not measured), one ``variance`` (exact DG variance, counts²) and exact ``sigma2``."""

    values: np.ndarray
    variance: float
    sigma2: Fraction


def _answers(unit: np.ndarray, cell: np.ndarray, count: np.ndarray, row0: int, n_rows: int,
             cell_to_answer: np.ndarray, n_answers: int) -> np.ndarray:
    """int64 ``(n_rows, n_answers)`` query answers from sparse entries of rows ``row0:row0+n_rows``
    (entries of a :class:`SparseHistogram`: each (unit, cell) at most once)."""
    idx = (unit - row0) * n_answers + cell_to_answer[cell]
    if n_answers == cell_to_answer.size and _injective(cell_to_answer):
        # every cell its own answer (the detailed query): each index at most once, so the answers
        # are the counts put in place — no float sums over a mostly zero matrix
        flat = np.zeros(n_rows * n_answers, np.int64)
        flat[idx] = count
        return flat.reshape(n_rows, n_answers)
    out = np.bincount(idx, weights=count, minlength=n_rows * n_answers)
    return np.rint(out).astype(np.int64).reshape(n_rows, n_answers)  # counts < 2^53: exact


def _injective(cell_to_answer: np.ndarray) -> bool:
    """Whether no two cells share an answer."""
    seen = np.zeros(cell_to_answer.size, bool)
    seen[cell_to_answer] = True
    return bool(seen.all())


def _entries(hist: SparseHistogram, ptr: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse entries of the given (distinct) units: (row position in ``units``, cell, count)."""
    starts, ends = ptr[units], ptr[units + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    offs = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    rows = np.repeat(np.arange(units.size), lengths)
    return rows, hist.cell[offs], hist.count[offs]


def _file_meta(level: str, start: int, stop: int, full: bool, strategy: Strategy) -> dict[bytes, bytes]:
    """Parquet key-value metadata: what was measured, and every query's σ² and variance (so a
    query whose answers were all skipped is still known to the loader)."""
    queries = [[q, _frac_text(strategy.sigma2(level, q)), discrete_gaussian_variance(strategy.sigma2(level, q))]
               for q in strategy.queries(level)]
    return {b"dptab.level": level.encode(), b"dptab.units": f"{start}:{stop}".encode(),
            b"dptab.full": str(bool(full)).encode(), b"dptab.strategy": strategy.name.encode(),
            b"dptab.queries": json.dumps(queries).encode()}


def _frac_text(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def measure_shard(path: str | Path, hist: SparseHistogram, spec: HistogramSpec, strategy: Strategy,
                  level: str, start: int, stop: int, source: RandomSource | None = None, *,
                  parent: SparseHistogram | None = None, parent_of: np.ndarray | None = None,
                  full: bool = False) -> MeasureResult:
    """Measure units ``start:stop`` of ``level`` once and write ``path`` (or reuse it).

    ``hist``: the level's confidential histogram; ``parent`` the parent level's published
    integer histogram and ``parent_of`` the parent index of each unit ``start:stop`` (int64,
    ``(stop - start,)``) — with both given and ``full=False``, answers whose parent answer is
    zero are skipped. ``source`` defaults to the secure source.
    """
    path = Path(path)
    reused = reused_measurements(path, strategy, level, start, stop, full=full)
    if reused is not None:
        return reused
    meta = _file_meta(level, start, stop, full, strategy)
    if not 0 <= start <= stop <= hist.n_units:
        raise MeasurementError(f"{level}: bad unit range {start}:{stop} of {hist.n_units}")
    if hist.n_cells != spec.n_cells:
        raise MeasurementError(f"{level}: histogram has {hist.n_cells} cells, spec {spec.name!r} has {spec.n_cells}")
    skip = parent is not None and not full
    if parent is not None and not full:
        if parent_of is None:
            raise MeasurementError(f"{level}: a parent histogram needs parent_of (the parent index of each unit)")
        parent_of = np.asarray(parent_of, dtype=np.int64)
        if parent_of.shape != (stop - start,):
            raise MeasurementError(f"{level}: parent_of must have shape ({stop - start},), got {parent_of.shape}")
        parent_ptr = parent.unit_ptr()
    src = resolve_source(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    rows = skipped = 0
    layout: dict[str, list] = {"queries": [], "row_groups": []}
    try:
        # statistics only where the loader uses them (the unit range of a row group; its query
        # is named by the layout written below): those of the other columns were a third of the
        # encoding time, the query's alone an eighth. Dictionaries only where they pay: the two
        # constant texts and the noisy values (a few thousand distinct); the sorted units, the
        # repeating answer index and the constant variance compress as well without (zstd), and
        # hashing them was a quarter of the encoding time
        with pq.ParquetWriter(tmp, _WRITE_SCHEMA, compression=_COMPRESSION, store_schema=False,
                              write_statistics=["unit"], use_dictionary=["query", "sigma2", "value"],
                              column_encoding=_ENCODING) as writer:
            writer.add_key_value_metadata(meta)
            for qname in strategy.queries(level):
                q_rows0 = rows
                q = spec.query(qname)
                s2 = strategy.sigma2(level, qname)
                var, s2_text = discrete_gaussian_variance(s2), _frac_text(s2)
                chunk = max(1, BATCH_ANSWERS // q.n_answers)
                variance = np.full(min(chunk, stop - start) * q.n_answers, var)  # every batch's column, sliced
                for c0 in range(start, stop, chunk):
                    c1 = min(stop, c0 + chunk)
                    lo, hi = np.searchsorted(hist.unit, [c0, c1], side="left")
                    true = _answers(hist.unit[lo:hi], hist.cell[lo:hi], hist.count[lo:hi], c0, c1 - c0,
                                    q.cell_to_answer, q.n_answers)
                    if skip:
                        assert parent is not None and parent_of is not None  # checked above
                        pu, inv = np.unique(parent_of[c0 - start:c1 - start], return_inverse=True)
                        r, c, k = _entries(parent, parent_ptr, pu)
                        pans = _answers(r, c, k, 0, pu.size, q.cell_to_answer, q.n_answers)
                        flat = np.flatnonzero(pans[inv] > 0)
                        skipped += true.size - flat.size
                        unit, answer, value = c0 + flat // q.n_answers, (flat % q.n_answers).astype(np.int32), \
                            true.reshape(-1)[flat]
                    else:  # every answer, units then answers (the same rows, without an index)
                        unit = np.repeat(np.arange(c0, c1, dtype=np.int64), q.n_answers)
                        answer = np.tile(np.arange(q.n_answers, dtype=np.int32), c1 - c0)
                        value = true.reshape(-1)
                    n = value.size
                    value += discrete_gaussian(s2, n, src)  # value is this batch's own array
                    writer.write_table(pa.table({
                        "unit": unit,
                        "query": repeated_text(qname, n, index_type=np.int8),
                        "answer": answer,
                        "value": value,
                        "variance": variance[:n],
                        "sigma2": repeated_text(s2_text, n, index_type=np.int8),
                    }, schema=_WRITE_SCHEMA), row_group_size=ROW_GROUP_ROWS)
                    rows += n
                    # how write_table cuts a table into row groups (none spans two calls)
                    whole, rest = divmod(n, ROW_GROUP_ROWS)
                    layout["row_groups"] += [ROW_GROUP_ROWS] * whole + ([rest] if rest else [])
                layout["queries"].append([qname, rows - q_rows0])
            writer.add_key_value_metadata({LAYOUT_KEY: json.dumps(layout, separators=(",", ":")).encode()})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and refuses to replace an existing file
        except FileExistsError:  # another process won the race: its noise is the one used
            return _reuse(path, meta)
    finally:
        tmp.unlink(missing_ok=True)
    return MeasureResult(path, rows, True, skipped)


def reused_measurements(path: str | Path, strategy: Strategy, level: str, start: int, stop: int, *,
                        full: bool = False) -> MeasureResult | None:
    """The measurements :func:`measure_shard` would reuse for this request (the file at ``path``,
    checked to have been made for it; :class:`MeasurementError` if it was not), or ``None`` if
    there is no file yet. A caller checks this before reading the confidential histogram and the
    parent's answers that drawing needs: the full estimator's level steps, and every retry or
    resume, reuse every shard's file and need neither."""
    path = Path(path)
    return _reuse(path, _file_meta(level, start, stop, full, strategy)) if path.exists() else None


def _reuse(path: Path, meta: dict[bytes, bytes]) -> MeasureResult:
    """Reuse an existing measurement file after checking it was made for the same request."""
    try:
        md = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise MeasurementError(f"{path}: existing measurement file is unreadable ({exc}); "
                               "it is never overwritten — inspect it") from exc
    have = md.metadata or {}
    for k, v in meta.items():
        if have.get(k) != v:
            raise MeasurementError(f"{path}: existing measurement file was made for {k.decode()}="
                                   f"{have.get(k, b'?').decode()}, not {v.decode()}; refusing to reuse or overwrite it")
    return MeasureResult(path, md.num_rows, False, 0)


def check_measurement_columns(path: str | Path) -> None:
    """Raise :class:`MeasurementError` unless ``path`` is a Parquet file with exactly the
    measurement columns (so no other column, e.g. a true answer, can be read or published past
    this)."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise MeasurementError(f"{path}: not a readable measurement file ({exc})") from None
    if tuple(sorted(names)) != tuple(sorted(COLUMNS)):
        raise MeasurementError(f"{path}: a measurement file has exactly the columns {COLUMNS}, found {names}")


def read_measurement_rows(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """The rows of one measurement file (``unit, query, answer, value, variance, sigma2``; see
    ``docs/contracts.md``), or only ``columns``. The reader of the raw rows for the review;
    the engine reads through :func:`load_measurements`, the release copies the files after
    :func:`check_measurement_columns`.
    Raises :class:`MeasurementError` if the file does not have exactly the measurement columns."""
    check_measurement_columns(path)
    return pl.read_parquet(path, columns=columns)


def load_measurements(paths: str | Path | list[str | Path], spec: HistogramSpec, start: int, stop: int,
                      queries: list[str] | tuple[str, ...] | None = None,
                      sum_by: np.ndarray | None = None) -> dict[str, QueryMeasurements]:
    """Per query, the dense float matrix ``(stop - start, n_answers)`` of units ``start:stop``
    (row ``i`` = unit ``start + i``; NaN where not measured) with its variance and σ².

    Every query the files were made for is returned (all NaN if every answer was skipped);
    ``queries`` restricts and orders the result and must be a subset of them.

    ``sum_by``: int64 ``(g,)``, the first unit (from ``start``, ascending, ``sum_by[0] == 0``) of
    each of ``g`` groups of consecutive units (e.g. each parent's children): the values are then
    the groups' sums, ``(g, n_answers)``, summed as the rows stream by (the units' matrix is never
    made). Every answer of every unit must be measured, in draw order (a full measurement, as
    :func:`measure_shard` writes it); else :class:`MeasurementError`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    known: dict[str, tuple[Fraction, float]] = {}
    for p in paths:
        try:
            meta = pq.read_schema(p).metadata or {}
            for q, s2, var in json.loads(meta[b"dptab.queries"]):
                if q in known and known[q][0] != Fraction(s2):
                    raise MeasurementError(f"query {q!r} has different sigma2 in {paths}")
                known[q] = (Fraction(s2), float(var))
        except (KeyError, ValueError) as exc:
            raise MeasurementError(f"{p}: not a measurement file written by measure_shard ({exc!r})") from None
        check_measurement_columns(p)  # the one reader's column check (exactly the measurement columns)
    wanted = list(queries) if queries is not None else list(known)
    missing = [q for q in wanted if q not in known]
    if missing:
        raise MeasurementError(f"no measurements of {missing} in {[str(p) for p in paths]}; "
                               f"they hold {list(known)}")
    n = stop - start
    fills: dict[str, _Fill] = {q: (_Fill(n, spec.query(q).n_answers, start, q, paths) if sum_by is None
                                   else _SumFill(n, spec.query(q).n_answers, start, q, paths, sum_by))
                               for q in wanted}
    _query_rows(paths, start, stop, fills, set(known))
    return {q: QueryMeasurements(f.result(), known[q][1], known[q][0]) for q, f in fills.items()}


def read_unit_rows(path: str | Path, n_answers: Mapping[str, int], start: int, stop: int) -> dict[str, np.ndarray]:
    """Per query of ``n_answers`` (name -> answers), the dense float64 matrix ``(stop - start,
    n_answers[q])`` of units ``start:stop`` from a Parquet file of ``unit, query, answer, value``
    rows (NaN where the file has no row): the reader of :func:`load_measurements` for any file of
    those columns (the full estimator's targets). Only the row groups whose ``unit`` statistics
    overlap the range are read, one at a time (each group read on its own), so memory is the
    result plus one row group, whatever the file's size."""
    fills = {q: _Fill(stop - start, int(na), start, q, [path]) for q, na in n_answers.items()}
    _query_rows([path], start, stop, fills, set(n_answers))
    return {q: f.result() for q, f in fills.items()}


class _Fill:
    """One query's dense ``(n, n_answers)`` float64 matrix, filled batch by batch from its rows.

    A complete file in draw order (what :func:`measure_shard` writes when no answer is skipped)
    arrives as consecutive runs of the flat index ``(unit - start) · n_answers + answer`` from
    0 on: those are copied into place and nothing is NaN-filled. At the first batch that does
    not continue that run (answers skipped, rows in another order) the rest of the matrix is
    set to NaN and this and every later batch is scattered (a repeated answer: the last row
    wins). Filling batch by batch keeps one row group in memory, not the whole range's rows."""

    def __init__(self, n: int, n_answers: int, start: int, name: str, paths: list[str | Path]) -> None:
        self.values = np.empty((n, n_answers))
        self.flat = self.values.reshape(-1)
        self.n_answers, self.start, self.name, self.paths = n_answers, start, name, paths
        self.pos = 0  # answers filled in draw order so far (while ``ordered``)
        self.ordered = True

    def add(self, unit: np.ndarray, answer: np.ndarray, value: np.ndarray) -> None:
        """Rows of units in ``start:start + n`` (int64 unit, int32 answer, int64 value)."""
        k = answer.size
        if k == 0:
            return
        if int(answer.min()) < 0 or int(answer.max()) >= self.n_answers:
            raise MeasurementError(f"query {self.name!r}: answer index out of range 0..{self.n_answers - 1} "
                                   f"in {[str(p) for p in self.paths]}")
        idx = (unit - self.start) * self.n_answers + answer
        if self.ordered and int(idx[0]) == self.pos and int(idx[-1]) == self.pos + k - 1 \
                and (k == 1 or bool(np.all(idx[1:] > idx[:-1]))):  # increasing from pos to pos+k-1: a run
            self.put(self.pos, value)
            return
        self._unorder()
        self.flat[idx] = value

    def put(self, offset: int, values: np.ndarray) -> None:
        """A run of answers in draw order at flat index ``offset`` (``(unit - start) · n_answers +
        answer`` of its first row), as :meth:`add` would place them from their rows."""
        k = values.size
        if k == 0:
            return
        if self.ordered and offset == self.pos:
            self.pos += k
        else:
            self._unorder()
        self.flat[offset:offset + k] = values

    def _unorder(self) -> None:
        """The draw order broke: NaN wherever nothing was placed yet, and scatter from now on."""
        if self.ordered:
            self.flat[self.pos:] = np.nan
            self.ordered = False

    def result(self) -> np.ndarray:
        if self.ordered:
            self.flat[self.pos:] = np.nan  # answers never measured (skipped, or no file row)
        return self.values


class _SumFill(_Fill):
    """:class:`_Fill` for ``load_measurements(..., sum_by=...)``: the groups' sums ``(g,
    n_answers)``, added run by run as the answers come in draw order (a run may start or end
    inside a unit: those partial rows are added where they fall). The values are integers, so
    the sums are exact whatever the order of the additions (below 2**53)."""

    def __init__(self, n: int, n_answers: int, start: int, name: str, paths: list[str | Path],
                 sum_by: np.ndarray) -> None:
        starts = np.asarray(sum_by, dtype=np.int64)
        if starts.ndim != 1 or (starts.size and (starts[0] != 0 or np.any(np.diff(starts) < 0) or starts[-1] > n)) \
                or (n and not starts.size):
            raise MeasurementError(f"sum_by must start at 0 and ascend within the {n} units read")
        self.sums = np.zeros((starts.size, n_answers))
        self.group = np.repeat(np.arange(starts.size), np.diff(np.append(starts, n)))  # unit -> its group
        self.n, self.n_answers, self.start, self.name, self.paths = n, n_answers, start, name, paths
        self.pos = 0
        self.ordered = True

    def put(self, offset: int, values: np.ndarray) -> None:
        k, na = values.size, self.n_answers
        if k == 0:
            return
        if offset != self.pos:
            self._unorder()
        u, a = divmod(offset, na)
        i = 0
        if a:  # the rest of a unit begun in the last run
            i = min(na - a, k)
            self.sums[self.group[u], a:a + i] += values[:i]
            u += 1
        m = (k - i) // na
        if m:  # whole units: summed by group (consecutive, each once)
            g = self.group[u:u + m]
            first = np.concatenate([[0], np.flatnonzero(np.diff(g)) + 1])
            self.sums[g[first]] += sum_children(values[i:i + m * na].reshape(m, na), first)
            i += m * na
            u += m
        if i < k:  # the start of a unit the next run ends
            self.sums[self.group[u], :k - i] += values[i:]
        self.pos += k

    def _unorder(self) -> None:
        raise MeasurementError(f"query {self.name!r}: rows not every answer in draw order in "
                               f"{[str(p) for p in self.paths]}; summed measurements need a full measurement")

    def result(self) -> np.ndarray:
        if self.pos != self.n * self.n_answers:
            raise MeasurementError(f"query {self.name!r}: {self.n * self.n_answers - self.pos} answer(s) of units "
                                   f"{self.start}:{self.start + self.n} not measured in {[str(p) for p in self.paths]}")
        return self.sums


def _query_rows(paths: list[str | Path], start: int, stop: int, fills: dict[str, _Fill], known: set[str]) -> None:
    """Give every wanted query's ``_Fill`` (``fills``) the ``(unit, answer, value)`` rows with
    units in ``start:stop``, row group by row group, in file and row order. Only the row groups
    whose ``unit`` statistics overlap the range are read; :func:`measure_shard` writes one query
    per row group, so the ``query`` statistics (min = max, one of the files' ``known`` queries) name a group's query without
    reading the column; any other group (several queries, or statistics that are not exactly a
    known name) is split by its dictionary codes, so no row is skipped on a statistic alone."""
    index = {q: i for i, q in enumerate(fills)}
    for p in paths:
        pf = pq.ParquetFile(p, read_dictionary=["query"])
        md = pf.metadata
        col = {md.schema.column(j).name: j for j in range(md.num_columns)}
        named = layout_labels(md, known)
        done = _complete_runs(pf, named, start, stop, fills, col["unit"]) if named is not None else set()
        groups: list[int] = []
        labels: list[str | None] = []
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            us, qs = rg.column(col["unit"]).statistics, rg.column(col["query"]).statistics
            if us is not None and us.has_min_max and (us.max < start or us.min >= stop):
                continue
            label: str | None
            if named is not None:
                label = named[g][0]
            else:
                label = qs.min if qs is not None and qs.has_min_max and qs.min == qs.max else None
                if not (isinstance(label, str) and label in known):
                    label = None  # read the group's query column
            if label is not None and (label not in index or label in done):
                continue  # a whole row group of a query not asked for, or already read
            groups.append(g)
            labels.append(label)
        if not groups:
            continue
        mixed = any(label is None for label in labels)
        columns = ["unit", "answer", "value"] + (["query"] if mixed else [])
        for g, label in zip(groups, labels):
            t = pf.read_row_group(g, columns=columns)
            unit = t.column("unit").to_numpy()
            answer = t.column("answer").to_numpy()
            value = t.column("value").to_numpy()
            keep = (unit >= start) & (unit < stop)
            if label is not None:
                if not keep.all():
                    unit, answer, value = unit[keep], answer[keep], value[keep]
                fills[label].add(unit, answer, value)
                continue
            code = np.concatenate([np.array([index.get(s, -1) for s in c.dictionary.to_pylist()] or [-1],
                                            dtype=np.int64)[c.indices.to_numpy(zero_copy_only=False)]
                                   for c in t.column("query").chunks] or [np.empty(0, np.int64)])
            for qname, i in index.items():
                sel = keep & (code == i)
                if sel.any():
                    fills[qname].add(unit[sel], answer[sel], value[sel])


def layout_labels(md: pq.FileMetaData, known: set[str]) -> list[tuple[str, int]] | None:
    """Per row group, its query and the row of that query's first row in the file (file order),
    from the file's :data:`LAYOUT_KEY`; ``None`` unless the file's row groups are exactly the
    recorded ones and every recorded query is one of ``known`` (a file rewritten with other row
    groups, or written before the layout was recorded, is read by its statistics instead)."""
    raw = (md.metadata or {}).get(LAYOUT_KEY)
    if raw is None:
        return None
    try:
        layout = json.loads(raw)
        queries = [(str(q), int(r)) for q, r in layout["queries"]]
        sizes = [int(r) for r in layout["row_groups"]]
    except (ValueError, KeyError, TypeError):
        return None
    if sizes != [md.row_group(g).num_rows for g in range(md.num_row_groups)] \
            or sum(r for _, r in queries) != md.num_rows or any(q not in known for q, _ in queries):
        return None
    out: list[tuple[str, int]] = []
    qi, q_first, row = 0, 0, 0  # the current query, the file row of its first row, this group's
    for n in sizes:
        while qi < len(queries) and row >= q_first + queries[qi][1]:
            q_first += queries[qi][1]
            qi += 1
        if qi == len(queries) or row + n > q_first + queries[qi][1]:
            return None  # a group across two queries: not how measure_shard writes
        out.append((queries[qi][0], row - q_first))
        row += n
    return out


def _complete_runs(pf: pq.ParquetFile, named: list[tuple[str, int]], start: int, stop: int,
                   fills: dict[str, _Fill], unit_col: int) -> set[str]:
    """Fill the wanted queries that hold every answer of the file's units from their ``value``
    column alone; returns the queries so read. Such a query's rows are in draw order (units,
    then answers: :func:`measure_shard`), so row ``r`` of it is unit ``u0 + r // n_answers``,
    answer ``r % n_answers`` — the ``unit`` and ``answer`` columns, which cost four times the
    values to decode and check, say nothing more. Every group read must carry the ``unit``
    statistics of its rows, else the query is left to the row-by-row reader."""
    md = pf.metadata
    try:
        u0, u1 = (int(x) for x in (md.metadata or {})[b"dptab.units"].split(b":"))
    except (KeyError, ValueError):
        return set()
    rows: dict[str, int] = {}  # per query, its rows in the file
    for g, (q, _) in enumerate(named):
        rows[q] = rows.get(q, 0) + md.row_group(g).num_rows
    lo, hi = max(start, u0), min(stop, u1)
    done: set[str] = set()
    for q, f in fills.items():
        na = f.n_answers
        if q not in rows or rows[q] != (u1 - u0) * na or rows[q] == 0:
            continue
        if lo >= hi:  # none of the file's units asked for
            done.add(q)
            continue
        a, b = (lo - u0) * na, (hi - u0) * na  # the query's rows wanted
        picks = [(g, first) for g, (name, first) in enumerate(named)
                 if name == q and first < b and first + md.row_group(g).num_rows > a]
        ok = True
        for g, first in picks:
            st = md.row_group(g).column(unit_col).statistics
            last = first + md.row_group(g).num_rows - 1
            if st is None or not st.has_min_max or (st.min, st.max) != (u0 + first // na, u0 + last // na):
                ok = False
                break
        if not ok:
            continue
        values = pf.read_row_groups([g for g, _ in picks], columns=["value"]).column("value").to_numpy()
        first = picks[0][1]  # the groups picked are consecutive and hold rows a..b-1
        f.put((lo - start) * na, values[a - first:b - first])
        done.add(q)
    return done
