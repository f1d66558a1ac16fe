"""P.L. 94-171 tables from published histograms: definitions as data, tabulation as a sparse product.

``schemas/tables/pl94.yaml`` declares every table line as a filter over the cells of a histogram
spec (persons: ``schemas/pl94.yaml``, 2,016 cells; housing units: ``schemas/units.yaml``, 2
cells). :func:`load_tables` turns each table into a 0/1 matrix ``A`` of shape
``(n_lines, n_cells)``; the table of every unit of a level is then one sparse product
``X @ A.T`` where ``X`` is the level's histogram as a ``(n_units, n_cells)`` CSR matrix — no
Python loop over units, so millions of blocks tabulate in a few passes over the histogram.

Outputs are in long format (one row per unit and line): ``geoid, geolevel, name, table, line,
label, count, moe90`` (:func:`long_frame`). Tables are computed only from *published*
(post-processed) histograms; this module never sees confidential data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from pipeline.errors import ConfigurationError
from pipeline.files import parquet_stream, read_ahead, repeated_text
from pipeline.model.geonames import unit_names
from pipeline.model.schemas import SCHEMAS_DIR, load_yaml, relative_to
from pipeline.model.spec import HistogramSpec, load_spec

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.model.geography import Geography

TABLES_DIR = SCHEMAS_DIR / "tables"
HISTOGRAM_KINDS = ("persons", "units")


class TableError(ConfigurationError):
    """A table definition file is malformed, or a histogram does not fit the table's spec."""


class HistogramLike(Protocol):
    """What tabulation reads from a ``pipeline.histograms.SparseHistogram``.

    ``unit``, ``cell``, ``count``: int64 arrays sorted by ``(unit, cell)``, counts > 0.
    """

    n_units: int
    n_cells: int
    unit: np.ndarray
    cell: np.ndarray
    count: np.ndarray


@dataclass(frozen=True)
class TableDef:
    """One table: its lines and their 0/1 cell matrix.

    ``matrix`` is CSR int64 of shape ``(n_lines, n_cells)`` of the table's histogram spec;
    ``sums`` maps a line number to the line numbers that must add up to it.
    """

    name: str
    title: str
    universe: str
    histogram: str
    numbers: tuple[int, ...]
    labels: tuple[str, ...]
    matrix: sp.csr_matrix = field(repr=False, compare=False)
    sums: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False)

    @property
    def n_lines(self) -> int:
        return len(self.numbers)

    def index(self, line: int) -> int:
        """Column of line number ``line`` in a tabulated ``(n_units, n_lines)`` array."""
        try:
            return self.numbers.index(int(line))
        except ValueError:
            raise TableError(f"table {self.name} has no line {line}") from None


@dataclass(frozen=True)
class CheckLine:
    """An unpublished line used only by the consistency checks (e.g. household population)."""

    name: str
    label: str
    histogram: str
    vector: np.ndarray = field(repr=False, compare=False)  # 0/1 int64 (n_cells,)


@dataclass(frozen=True)
class TableSet:
    """Every table of a product, with the check declarations of ``schemas/tables/<name>.yaml``."""

    name: str
    tables: dict[str, TableDef]
    check_lines: dict[str, CheckLine]
    equal_checks: tuple[tuple[tuple[str, int | None], tuple[tuple[str, int | None], ...]], ...]
    subset_checks: tuple[tuple[str, str], ...]
    specs: dict[str, HistogramSpec] = field(repr=False, compare=False)
    source: Path | None = None

    def of_kind(self, kind: str) -> list[TableDef]:
        """The tables computed from the ``persons`` or the ``units`` histogram."""
        return [t for t in self.tables.values() if t.histogram == kind]

    def total_line(self, kind: str) -> tuple[str, int] | None:
        """``(table, line)`` of the first line of a ``kind`` table that counts every cell (the
        total population, the total housing units: P1 line 1, H1 line 1), or None."""
        for t in self.of_kind(kind):
            dense = t.matrix.toarray()
            for r, num in enumerate(t.numbers):
                if dense.shape[1] and bool(np.all(dense[r] == 1)):
                    return t.name, num
        return None


def _cell_mask(spec: HistogramSpec, where: Mapping[str, list], what: str) -> np.ndarray:
    """Boolean ``(n_cells,)`` mask of a ``where`` filter (attributes by code, recodes by label)."""
    if not isinstance(where, Mapping):
        raise TableError(f"{what}: `where` must be a mapping, got {where!r}")
    grids = np.indices(spec.shape).reshape(len(spec.shape), -1)
    mask = np.ones(spec.n_cells, dtype=bool)
    for factor, values in where.items():
        if not isinstance(values, list) or not values:
            raise TableError(f"{what}: `where.{factor}` must be a non-empty list")
        if factor in spec.recodes:
            attr_name, m, labels = spec.factor_map(factor)
            unknown = [v for v in values if v not in labels]
            if unknown:
                raise TableError(f"{what}: recode {factor!r} has no group(s) {unknown}; groups: {list(labels)}")
            keep_groups = np.array([labels.index(v) for v in values])
            keep_pos = np.isin(m, keep_groups)
        else:
            try:
                attr = spec.attribute(factor)
            except Exception:
                raise TableError(f"{what}: {factor!r} is neither an attribute nor a recode of spec {spec.name!r}") from None
            attr_name = attr.name
            unknown = [v for v in values if v not in attr.codes]
            if unknown:
                raise TableError(f"{what}: attribute {factor!r} has no code(s) {unknown}")
            keep_pos = np.zeros(attr.size, dtype=bool)
            keep_pos[attr.index_of(np.array(values))] = True
        mask &= keep_pos[grids[spec.axis(attr_name)]]
    return mask


def _ref(item, what: str) -> tuple[str, int | None]:
    """A check operand: ``[table, line]`` or the name of a check line."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, list) and len(item) == 2:
        return str(item[0]), int(item[1])
    raise TableError(f"{what}: operand must be [table, line] or a check-line name, got {item!r}")


@lru_cache(maxsize=8)
def load_tables(path: str | Path = "pl94") -> TableSet:
    """Load and validate a table product (a YAML file, or a name in ``schemas/tables/``)."""
    p = Path(path)
    if not p.suffix:
        p = TABLES_DIR / f"{path}.yaml"
    raw = load_yaml(p, TableError, "table definition")
    try:
        base = p.resolve().parent  # spec files named by a relative path sit beside the definitions
        specs = {"persons": load_spec(relative_to(str(raw["persons_spec"]), base)),
                 "units": load_spec(relative_to(str(raw["units_spec"]), base))}
        tables: dict[str, TableDef] = {}
        for name, t in raw["tables"].items():
            kind = t["histogram"]
            if kind not in specs:
                raise TableError(f"{p}: table {name}: histogram must be one of {HISTOGRAM_KINDS}")
            spec = specs[kind]
            universe = _cell_mask(spec, t.get("where") or {}, f"{p}: table {name}")
            numbers, labels, rows = [], [], []
            for ln in t["lines"]:
                num = int(ln["line"])
                mask = universe & _cell_mask(spec, ln.get("where") or {}, f"{p}: {name} line {num}")
                numbers.append(num)
                labels.append(str(ln["label"]))
                rows.append(mask)
            if len(set(numbers)) != len(numbers):
                raise TableError(f"{p}: table {name} repeats a line number")
            dense = np.array(rows, dtype=np.int64)
            sums = {int(k): tuple(int(x) for x in v) for k, v in (t.get("sums") or {}).items()}
            td = TableDef(name, str(t["title"]), str(t["universe"]), kind, tuple(numbers), tuple(labels),
                          sp.csr_matrix(dense), sums)
            for k, parts in sums.items():  # every referenced line must exist
                td.index(k)
                for x in parts:
                    td.index(x)
            tables[name] = td
        check_lines = {}
        for name, c in (raw.get("check_lines") or {}).items():
            spec = specs[c["histogram"]]
            vec = _cell_mask(spec, c.get("where") or {}, f"{p}: check line {name}").astype(np.int64)
            check_lines[name] = CheckLine(name, str(c.get("label", name)), c["histogram"], vec)
        cc = raw.get("cross_checks") or {}
        equal = tuple(
            (_ref(e["left"], f"{p}: cross check"), tuple(_ref(r, f"{p}: cross check") for r in e["right"]))
            for e in cc.get("equal") or ()
        )
        subset = tuple((str(s["part"]), str(s["whole"])) for s in cc.get("subset") or ())
    except (KeyError, TypeError) as exc:
        raise TableError(f"{p}: malformed table definitions ({exc!r})") from exc
    ts = TableSet(str(raw["name"]), tables, check_lines, equal, subset, specs, p)
    for left, right in equal:
        for ref in (left, *right):
            _operand_kind(ts, ref)
    for part, whole in subset:
        if part not in tables or whole not in tables or tables[part].numbers != tables[whole].numbers:
            raise TableError(f"{p}: subset check {part} <= {whole} needs two tables with the same lines")
    return ts


def _operand_kind(ts: TableSet, ref: tuple[str, int | None]) -> str:
    name, line = ref
    if line is None:
        if name not in ts.check_lines:
            raise TableError(f"{ts.source}: unknown check line {name!r}")
        return ts.check_lines[name].histogram
    if name not in ts.tables:
        raise TableError(f"{ts.source}: unknown table {name!r}")
    ts.tables[name].index(line)
    return ts.tables[name].histogram


# --------------------------------------------------------------------------------------
# tabulation


@dataclass
class LevelTables:
    """The published tables of one level.

    ``geoids``: sorted unique GEOIDs ``(n_units,)`` (numpy strings; a digit-prefix release's
    bottom level in ``dptab verify``: :class:`pipeline.release.tree.CodedGeoids`, sliced the same
    way); ``counts[table]``: int64 ``(n_units, n_lines)`` in the table's line order;
    ``check_lines[name]``: int64 ``(n_units,)``.
    """

    level: str
    geoids: Any
    counts: dict[str, np.ndarray]
    check_lines: dict[str, np.ndarray] = field(default_factory=dict)


class RowSource(Protocol):
    """A published histogram read a range of units at a time (e.g. from its Parquet file), so a
    level is never in memory whole: ``rows(start, stop)`` is csr int64 ``(stop - start, n_cells)``."""

    n_units: int
    n_cells: int

    def rows(self, start: int, stop: int) -> sp.csr_matrix: ...


def as_sparse_arrays(hist: HistogramLike | np.ndarray | sp.csr_matrix
                     ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """``(n_units, n_cells, unit, cell, count)`` of a SparseHistogram, a dense ``(n_units, n_cells)``
    array or a csr matrix of that shape."""
    if sp.issparse(hist):
        coo = sp.coo_matrix(hist)
        return (int(coo.shape[0]), int(coo.shape[1]), coo.row.astype(np.int64), coo.col.astype(np.int64),
                coo.data.astype(np.int64))
    if isinstance(hist, np.ndarray):
        if hist.ndim != 2:
            raise TableError(f"a dense histogram must be 2-D (n_units, n_cells), got shape {hist.shape}")
        unit, cell = np.nonzero(hist)
        return hist.shape[0], hist.shape[1], unit.astype(np.int64), cell.astype(np.int64), hist[unit, cell].astype(np.int64)
    return (int(hist.n_units), int(hist.n_cells), np.asarray(hist.unit, dtype=np.int64),
            np.asarray(hist.cell, dtype=np.int64), np.asarray(hist.count, dtype=np.int64))


def histogram_matrix(hist: HistogramLike | np.ndarray) -> sp.csr_matrix:
    """The histogram as a CSR int64 matrix ``(n_units, n_cells)``."""
    n_units, n_cells, unit, cell, count = as_sparse_arrays(hist)
    return sp.csr_matrix((count, (unit, cell)), shape=(n_units, n_cells), dtype=np.int64)


def histogram_shape(hist: HistogramLike | RowSource | np.ndarray) -> tuple[int, int]:
    """``(n_units, n_cells)`` of a histogram in any of its forms."""
    if isinstance(hist, np.ndarray):
        return int(hist.shape[0]), int(hist.shape[1]) if hist.ndim == 2 else 0
    return int(hist.n_units), int(hist.n_cells)


def histogram_rows(hist: HistogramLike | RowSource | np.ndarray, start: int, stop: int) -> sp.csr_matrix:
    """Units ``start:stop`` of a histogram as csr int64 ``(stop - start, n_cells)``: read from a
    :class:`RowSource`, sliced from a dense array, or cut from a SparseHistogram's entries (sorted
    by unit) by binary search — never a copy of the whole level."""
    if hasattr(hist, "rows"):
        return hist.rows(start, stop)
    if isinstance(hist, np.ndarray):
        return histogram_matrix(hist[start:stop])
    unit = np.asarray(hist.unit)
    lo, hi = np.searchsorted(unit, [start, stop], side="left")
    return sp.csr_matrix((np.asarray(hist.count[lo:hi], np.int64),
                          (unit[lo:hi].astype(np.int64) - start, np.asarray(hist.cell[lo:hi], np.int64))),
                         shape=(stop - start, int(hist.n_cells)), dtype=np.int64)


def tabulate(hist: HistogramLike | np.ndarray | sp.csr_matrix, table: TableDef) -> np.ndarray:
    """Counts of every line for every unit: int64 ``(n_units, n_lines)``.

    ``hist`` is a SparseHistogram, a dense ``(n_units, n_cells)`` array or a CSR matrix of
    the table's spec. Each line is a 0/1 filter over cells, so this is ``X @ A.T``.
    """
    x = hist if sp.issparse(hist) else histogram_matrix(hist)
    if x.shape[1] != table.matrix.shape[1]:
        raise TableError(f"table {table.name} needs a {table.histogram} histogram with "
                         f"{table.matrix.shape[1]} cells, got {x.shape[1]}")
    return np.asarray((x @ table.matrix.T).toarray(), dtype=np.int64)


def tabulate_vector(hist: HistogramLike | np.ndarray | sp.csr_matrix, vector: np.ndarray) -> np.ndarray:
    """Sum of the cells selected by a 0/1 ``(n_cells,)`` vector, per unit: int64 ``(n_units,)``."""
    x = hist if sp.issparse(hist) else histogram_matrix(hist)
    return np.asarray(x @ np.asarray(vector, dtype=np.int64), dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------------------
# long format

LONG_SCHEMA = {
    "geoid": pl.Utf8, "geolevel": pl.Utf8, "name": pl.Utf8, "table": pl.Utf8,
    "line": pl.Int32, "label": pl.Utf8, "count": pl.Int64, "moe90": pl.Float64,
}


#: Census summary-level codes by GEOID length (the first three characters of a Census GEO_ID)
CENSUS_SUMMARY_LEVELS = {0: "010", 2: "040", 5: "050", 11: "140", 12: "150", 15: "100"}
#: what each summary level is called by the Census Bureau (for the codebook)
CENSUS_SUMMARY_LEVEL_NAMES = {"010": "Nation", "040": "State", "050": "County", "140": "Census Tract",
                              "150": "Block Group", "100": "Block"}

#: the release CSVs (``csv/<geolevel>/<table>.csv``): the long rows with the GEOID written as a
#: Census-style ``GEO_ID`` text key instead of the bare code (see :func:`census_geo_id`)
CSV_SCHEMA = {"GEO_ID": pl.Utf8, **{k: v for k, v in LONG_SCHEMA.items() if k != "geoid"}}


def summary_level(digits: int) -> str:
    """The three-character summary-level part of a GEO_ID for GEOIDs of ``digits`` digits.

    The six Census levels get their Census codes (nation 010, state 040, county 050, tract 140,
    block group 150, block 100); any other prefix length gets ``L`` and its two-digit length
    (e.g. ``L07``), which is not a Census code and cannot be mistaken for one. A lookup level
    (``digits`` -1) has none: ``""``.
    """
    if int(digits) < 0:
        return ""
    return CENSUS_SUMMARY_LEVELS.get(int(digits), f"L{int(digits):02d}")


def geo_id_prefix(level: str, digits: int) -> str:
    """What a level's CSV ``GEO_ID`` starts with: ``0500000US`` (Census), or ``<level>:`` for a
    lookup level (see :func:`csv_frame`)."""
    return f"{level}:" if int(digits) < 0 else f"{summary_level(digits)}0000US"


def census_geo_id(geoids: pl.Expr | pl.Series) -> pl.Expr | pl.Series:
    """The Census-style GEO_ID of plain GEOIDs: summary level + ``0000US`` + GEOID.

    ``"01105"`` -> ``"0500000US01105"``, nation ``""`` -> ``"0100000US"``, as on data.census.gov
    and in the ``GEOIDFQ`` column of TIGER/Line shapefiles. The ``US`` makes the value text to
    every CSV reader, so leading zeros survive default settings in pandas, polars, R and Excel,
    and the nation never reads as missing; the plain GEOID is everything after the first 9
    characters.
    """
    if isinstance(geoids, pl.Series):
        return geoids.to_frame("g").select(_geo_id_expr(pl.col("g")).alias("GEO_ID")).to_series()
    return _geo_id_expr(geoids)


def _geo_id_expr(geoids: pl.Expr) -> pl.Expr:
    sumlev = geoids.str.len_chars().replace_strict({d: summary_level(d) for d in range(19)}, return_dtype=pl.Utf8)
    return pl.concat_str([sumlev, pl.lit("0000US"), geoids])


def csv_frame(frame: pl.DataFrame, lookup: bool = False) -> pl.DataFrame:
    """Long rows (:data:`LONG_SCHEMA`) as written to the release CSVs (:data:`CSV_SCHEMA`).

    ``lookup``: a lookup geography's codes are not Census GEOIDs; their GEO_ID is
    ``<geolevel>:<code>`` (text to every reader, and the plain code is what follows the colon)."""
    if lookup:
        return frame.select(pl.concat_str([pl.col("geolevel"), pl.lit(":"), pl.col("geoid")]).alias("GEO_ID"),
                            pl.exclude("geoid"))
    lengths = frame["geoid"].str.len_chars()
    if frame.height and lengths.min() == lengths.max():  # one level per write: one prefix for every row
        geo_id = pl.lit(f"{summary_level(int(lengths[0]))}0000US") + pl.col("geoid")
    else:
        geo_id = _geo_id_expr(pl.col("geoid"))
    return frame.select(geo_id.alias("GEO_ID"), pl.exclude("geoid"))


def long_table(table: TableDef, level: str, geoids: np.ndarray, names: np.ndarray, counts: np.ndarray,
               moe90: np.ndarray | None = None) -> pa.Table:
    """One row per (unit, line), sorted by geoid then line, as an Arrow table of
    :data:`LONG_SCHEMA` (strings ``large_string``, what the release's table files hold).

    ``counts`` is int64 ``(n_units, n_lines)``; ``moe90`` is float ``(n_lines,)`` (the same for
    every unit of a level: the ``topdown`` margins) or ``(n_units, n_lines)`` (per unit: the
    ``full`` estimator's), rounded to 2 decimals, NaN → null where a line has no margin of
    error; ``None`` gives an all-null column.

    The text columns are gathered by Arrow from the per-unit and per-line values (``take``, which
    runs without the GIL): the rows are ~10x the units, and building their strings in Python or
    converting them from another frame was most of a release writer's time.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n_units, n_lines = counts.shape
    if n_lines != table.n_lines or len(geoids) != n_units or len(names) != n_units:
        raise TableError(f"{table.name}/{level}: counts {counts.shape} do not fit {len(geoids)} units x "
                         f"{table.n_lines} lines")
    n = n_units * n_lines
    if moe90 is None:
        moe_col = pa.nulls(n, pa.float64())
    else:
        # two decimals: the margin itself is an approximation; more digits only bloat the CSV
        m = np.round(np.asarray(moe90, dtype=np.float64), 2)
        moe = m.reshape(-1) if m.ndim == 2 else np.tile(m, n_units)
        if moe.size != n:
            raise TableError(f"{table.name}/{level}: moe90 of shape {m.shape} does not fit {n_units} x {n_lines}")
        moe_col = pa.array(moe, pa.float64(), from_pandas=True)  # NaN -> null
    unit_idx = pa.array(np.repeat(np.arange(n_units, dtype=np.int32), n_lines))
    line_idx = pa.array(np.tile(np.arange(n_lines, dtype=np.int32), n_units))
    text = pa.large_string()

    def same(value: str) -> pa.Array:  # one value in every row
        return repeated_text(value, n, text).cast(text)

    return pa.table({
        "geoid": pc.take(pa.array(np.asarray(geoids).astype(str, copy=False), text), unit_idx),
        "geolevel": same(level),
        "name": pc.take(pa.array(np.asarray(names, dtype=object), text), unit_idx),
        "table": same(table.name),
        "line": pc.take(pa.array(np.asarray(table.numbers, np.int32), pa.int32()), line_idx),
        "label": pc.take(pa.array(list(table.labels), text), line_idx),
        "count": pa.array(np.ascontiguousarray(counts, dtype=np.int64).reshape(-1), pa.int64()),
        "moe90": moe_col,
    })


def long_frame(table: TableDef, level: str, geoids: np.ndarray, names: np.ndarray, counts: np.ndarray,
               moe90: np.ndarray | None = None) -> pl.DataFrame:
    """:func:`long_table` as a polars frame (columns :data:`LONG_SCHEMA`)."""
    df = pl.from_arrow(long_table(table, level, geoids, names, counts, moe90))
    assert isinstance(df, pl.DataFrame)
    return df


def _to_frame(batch: Any) -> pl.DataFrame:
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    return df


def frames_ahead(batches: Iterator[Any]) -> Iterator[pl.DataFrame]:
    """The record batches of ``batches`` (a ``pyarrow`` batch iterator) as polars frames, the next
    one read and converted on a reader thread while the caller works on this one
    (:func:`pipeline.files.read_ahead`: Parquet decoding and the conversion run without the GIL,
    so a reader of a large file — the verifier, the explorer — keeps a second core busy)."""
    return read_ahead(batches, _to_frame)


class RowStream:
    """The rows of one Parquet file in file order from row ``start``, ``n`` at a time (read by
    record batches from the row group holding ``start`` on, so the file is never in memory whole;
    the next batch is read ahead on a reader thread, :func:`frames_ahead`).

    With ``categorical`` the string columns come as polars ``Categorical`` (read from the file's
    dictionary pages without building a string per row: ~3x faster for a reader that compares
    them or uses one row in ``n_lines``, the check and the explorer; cast to ``Utf8`` where a
    string is needed)."""

    def __init__(self, path: Path, columns: Sequence[str] | None = None, start: int = 0,
                 batch_rows: int = 1 << 16, categorical: bool = False) -> None:
        import pyarrow as pa

        f = parquet_stream(path)
        if categorical:
            strings = [fl.name for fl in f.schema_arrow if (pa.types.is_string(fl.type) or pa.types.is_large_string(fl.type))
                       and (columns is None or fl.name in columns)]
            f = parquet_stream(path, read_dictionary=strings)
        md = f.metadata
        rg = first = 0
        while rg < md.num_row_groups and first + md.row_group(rg).num_rows <= start:
            first += md.row_group(rg).num_rows
            rg += 1
        self.batches = frames_ahead(f.iter_batches(batch_size=batch_rows, columns=columns,
                                                   row_groups=list(range(rg, md.num_row_groups))))
        self.buf: list[pl.DataFrame] = []
        self.rows = 0
        if start > first:
            self.take(start - first)

    def take(self, n: int) -> pl.DataFrame:
        """The next ``n`` rows (fewer at the end of the file)."""
        while self.rows < n:
            df = next(self.batches, None)
            if df is None:
                break
            self.buf.append(df)
            self.rows += df.height
        if not self.buf:
            return pl.DataFrame()
        whole = pl.concat(self.buf, rechunk=False) if len(self.buf) > 1 else self.buf[0]
        out, rest = whole.slice(0, n), whole.slice(n)
        self.buf, self.rows = ([rest] if rest.height else []), rest.height
        return out


def level_runs(path: Path) -> list[tuple[str, int]]:
    """``(geolevel, rows)`` of each run of equal ``geolevel`` values of a table file, in file
    order (one run per level when the file is laid out as written), from that column alone."""
    import pyarrow as pa

    runs: list[tuple[str, int]] = []
    # read as dictionary indices: a run is where the index changes (a string comparison per row
    # took ~20x longer)
    for batch in parquet_stream(path, read_dictionary=["geolevel"]).iter_batches(batch_size=1 << 20,
                                                                                columns=["geolevel"]):
        col = batch.column(0)
        if col.null_count or not hasattr(col, "indices"):  # damaged: compare the values themselves
            rle = pl.Series(col.cast(pa.large_string()) if hasattr(col, "indices") else col).rle().struct.unnest()
            pairs = zip(rle["len"].to_list(), rle["value"].to_list())
        else:
            idx = col.indices.to_numpy()
            starts = np.concatenate([[0], np.flatnonzero(idx[1:] != idx[:-1]) + 1]) if len(idx) else np.zeros(0, int)
            lengths = np.diff(np.append(starts, len(idx)))
            values = col.dictionary.to_pylist()
            pairs = zip(lengths.tolist(), [values[i] for i in idx[starts]])
        for n, lv in pairs:
            if runs and runs[-1][0] == str(lv):
                runs[-1] = (runs[-1][0], runs[-1][1] + int(n))
            else:
                runs.append((str(lv), int(n)))
    return runs


def tabulate_units(tables: TableSet, level: str, geoids: np.ndarray, persons: sp.csr_matrix | None,
                   units: sp.csr_matrix | None = None) -> LevelTables:
    """Every table of some units of a level (a whole level or a chunk of its units).

    ``geoids``: the units' GEOIDs ``(n,)``; ``persons``/``units``: their published histograms as
    csr int64 ``(n, n_cells)`` (``None``: that kind is not published, its tables are left out).
    """
    counts: dict[str, np.ndarray] = {}
    checks: dict[str, np.ndarray] = {}
    for kind, x in (("persons", persons), ("units", units)):
        if x is None:
            continue
        if x.shape[0] != len(geoids):
            raise TableError(f"{kind} histogram of level {level} has {x.shape[0]} units, geography has {len(geoids)}")
        for t in tables.of_kind(kind):
            counts[t.name] = tabulate(x, t)
        for c in tables.check_lines.values():
            if c.histogram == kind:
                checks[c.name] = tabulate_vector(x, c.vector)
    return LevelTables(level, geoids, counts, checks)


def tabulate_levels(tables: TableSet, geography: "Geography", persons: Mapping[str, HistogramLike],
                    units: Mapping[str, HistogramLike | np.ndarray] | None = None) -> list[LevelTables]:
    """Every table at every level of ``geography`` (top to bottom) from whole published histograms
    (in-memory use: tests, benchmarks; releases tabulate chunk by chunk with :func:`tabulate_units`).

    ``persons[level]`` is the level's persons histogram (2,016 cells), ``units[level]`` its
    housing-unit histogram (2 cells: vacant, occupied) as a SparseHistogram or a dense
    ``(n_units, 2)`` array. Levels missing from ``units`` get no H1.
    """
    return [tabulate_units(tables, lv.name, np.asarray(lv.geoids),
                           histogram_matrix(persons[lv.name]) if lv.name in persons else None,
                           histogram_matrix(units[lv.name]) if units and lv.name in units else None)
            for lv in geography.levels]


def long_tables(tables: TableSet, levels: list[LevelTables],
                moe90: Mapping[tuple[str, str], np.ndarray] | None = None) -> dict[str, pl.DataFrame]:
    """Every table in long format over all ``levels``: ``{table: DataFrame}`` (:data:`LONG_SCHEMA`).

    For in-memory use (review, notebooks); releases stream the same rows to disk per level.
    ``moe90[(table, level)]`` is float ``(n_lines,)`` as from ``pipeline.uncertainty.release_moe90``.
    """
    out: dict[str, list[pl.DataFrame]] = {}
    for lt in levels:
        names = unit_names(lt.level, lt.geoids)
        for name, counts in lt.counts.items():
            out.setdefault(name, []).append(long_frame(tables.tables[name], lt.level, lt.geoids, names, counts,
                                                       None if moe90 is None else moe90.get((name, lt.level))))
    return {name: pl.concat(frames) for name, frames in out.items()}
