"""Parquet input and output: opening input files, layouts, normalised readers, atomic writes.

The input contract (columns, types, domains, both persons layouts) is data:
``schemas/input_contract.yaml``. This module opens a Parquet file or a directory of part files,
checks what can be checked without reading the rows (existence, Parquet magic and footer,
identical schemas across parts, layout, column types) and builds the lazy expressions that
turn the raw columns into the normalised frames of ``docs/contracts.md``. Row values are
checked by :func:`pipeline.validation.validate_inputs` (re-exported here as
:func:`validate_inputs`), which reuses the same parsed-column expressions.

Every problem is reported as a :class:`Problem`; all problems found are raised together in one
:class:`InputValidationError` (the CLI maps it to exit status 2).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

if TYPE_CHECKING:
    from pipeline.spec import HistogramSpec
    from pipeline.validation import ValidatedInputs

CONTRACT_PATH = Path(__file__).resolve().parent.parent / "schemas" / "input_contract.yaml"
PARQUET_MAGIC = b"PAR1"
MAX_EXAMPLES = 5
# What a reader of a damaged file can raise: polars/pyarrow errors, and polars' Rust panics,
# which arrive as pyo3 PanicException (a BaseException, not an Exception).
READ_ERRORS: tuple[type[BaseException], ...] = (
    pl.exceptions.PolarsError, pl.exceptions.PanicException, pa.ArrowException, OSError, ValueError)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (panics carry long backtraces), truncated."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one column of one input file.

    ``count`` is the number of offending rows (or blocks, or ids, as ``detail`` says);
    ``first_rows`` are 0-based row numbers of the first offenders in the whole table (all
    parts of a directory, in file-name order) and ``examples`` the matching offending values.
    ``column`` is ``""`` for problems of the file as a whole.
    """

    file: str
    column: str
    kind: str
    count: int
    detail: str = ""
    first_rows: tuple[int, ...] = ()
    examples: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: ``file, column 'c': kind — detail (count N); first rows: row: value, ...``."""
        col = f", column '{self.column}'" if self.column else ""
        text = f"{self.file}{col}: {self.kind} — {self.detail} (count {self.count:,})"
        if self.first_rows and len(self.examples) == len(self.first_rows):
            text += "; first rows: " + ", ".join(f"{r}: {e}" for r, e in zip(self.first_rows, self.examples))
        elif self.first_rows:
            text += "; first rows: " + ", ".join(str(r) for r in self.first_rows)
        elif self.examples:
            text += "; e.g. " + ", ".join(self.examples)
        return text


class InputValidationError(ValueError):
    """The inputs break the contract. ``problems`` lists every problem found (never empty)."""

    exit_status = 2  # the CLI's status for invalid input

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(self.message())

    def message(self) -> str:
        n = len(self.problems)
        head = f"invalid input: {n} problem{'s' if n != 1 else ''} found"
        return "\n".join([head] + [f"  - {p.describe()}" for p in self.problems])

    def __str__(self) -> str:
        return self.message()


@lru_cache(maxsize=4)
def load_contract(path: str | Path = CONTRACT_PATH) -> dict[str, Any]:
    """The input contract as a dict (see ``schemas/input_contract.yaml``)."""
    return yaml.safe_load(Path(path).read_text())


# --------------------------------------------------------------------------------------
# opening Parquet files


@dataclass(frozen=True)
class ParquetSource:
    """A readable Parquet table: one file or the sorted part files of a directory.

    ``schema`` is the common polars schema; ``row_counts`` the rows per part (from the footers).
    """

    path: Path
    files: tuple[Path, ...]
    schema: dict[str, pl.DataType]
    row_counts: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return int(sum(self.row_counts))

    def scan(self) -> pl.LazyFrame:
        """Lazy scan of all parts (row order: parts in file-name order)."""
        return pl.scan_parquet([str(f) for f in self.files])

    def locate(self, row: int) -> str:
        """Human-readable position of a global 0-based row: ``part-1.parquet:12`` for parts."""
        if len(self.files) == 1:
            return str(row)
        ends = np.cumsum(self.row_counts)
        i = int(np.searchsorted(ends, row, side="right"))
        start = int(ends[i - 1]) if i else 0
        return f"{self.files[i].name}:{row - start}"


def _part_files(directory: Path) -> list[Path]:
    # Spark/Hadoop write _SUCCESS, _metadata and .crc files beside the parts: skip them.
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix == ".parquet" and not p.name.startswith(("_", ".")))


def _check_part(f: Path, label: str) -> tuple[dict[str, pl.DataType] | None, int, list[Problem]]:
    """Footer-level checks of one Parquet file: (schema, rows, problems)."""
    size = f.stat().st_size
    if size == 0:
        return None, 0, [Problem(label, "", "zero_byte_file", 1, "the file is empty (0 bytes), not Parquet")]
    with open(f, "rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if head != PARQUET_MAGIC:
        return None, 0, [Problem(label, "", "not_parquet", 1,
                                 f"does not start with the Parquet magic bytes (starts with {head!r})")]
    if tail != PARQUET_MAGIC or size < 12:
        return None, 0, [Problem(label, "", "truncated_parquet", 1,
                                 f"no Parquet footer at the end of its {size:,} bytes: the file is truncated")]
    try:
        rows = int(pq.read_metadata(f).num_rows)
        schema = dict(pl.read_parquet_schema(f))
    except READ_ERRORS as exc:  # pyarrow/polars raise several types for a corrupt footer
        return None, 0, [Problem(label, "", "corrupt_parquet", 1, f"unreadable Parquet footer: {first_line(exc)}")]
    return schema, rows, []


def open_parquet(path: str | Path) -> tuple[ParquetSource | None, list[Problem]]:
    """Open a Parquet file or directory of parts without reading rows.

    Returns the source (``None`` when it cannot be read) and the problems found: missing path,
    empty directory, zero-byte, non-Parquet, truncated or corrupt files, parts whose schemas
    differ (each differing part is named, against the first part).
    """
    path = Path(path)
    label = str(path)
    if not path.exists():
        return None, [Problem(label, "", "missing_path", 1, "no such file or directory")]
    files = _part_files(path) if path.is_dir() else [path]
    if not files:
        return None, [Problem(label, "", "empty_directory", 1, "the directory holds no *.parquet part files")]
    problems: list[Problem] = []
    schemas: list[tuple[Path, dict[str, pl.DataType]]] = []
    counts: list[int] = []
    for f in files:
        schema, rows, probs = _check_part(f, str(f))
        problems += probs
        if schema is not None:
            schemas.append((f, schema))
            counts.append(rows)
    if schemas:
        first_f, first = schemas[0]
        for f, s in schemas[1:]:
            if s != first:
                diff = sorted(set(s.items()) ^ set(first.items()), key=str)
                cols = sorted({name for name, _ in diff})
                detail = (f"part schema differs from {first_f.name} in column(s) "
                          + ", ".join(f"{c} ({first.get(c, 'absent')} vs {s.get(c, 'absent')})" for c in cols))
                problems.append(Problem(str(f), ",".join(cols), "schema_mismatch", 1, detail))
    if problems:
        return None, problems
    return ParquetSource(path, tuple(f for f, _ in schemas), schemas[0][1], tuple(counts)), []


# --------------------------------------------------------------------------------------
# layouts and column plans


def _category(dtype: pl.DataType) -> str:
    """Coarse dtype class: integer, string, boolean, null or other."""
    if dtype.is_integer():
        return "integer"
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "string"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype == pl.Null:
        return "null"
    return "other"


_ACCEPTED = {
    "digits": {"string", "null"},
    "digits+int": {"string", "integer", "null"},
    "integer": {"integer", "string", "null"},
    "boolean": {"boolean", "integer", "null"},
    "id": {"string", "integer", "null"},
}


@dataclass(frozen=True)
class ColumnPlan:
    """One contract column as found in a file: its spec and the dtype class it arrived in."""

    name: str
    spec: dict[str, Any]
    category: str

    @property
    def raw(self) -> pl.Expr:
        c = pl.col(self.name)
        return c.cast(pl.String) if self.category == "string" else c

    def parsed(self) -> pl.Expr:
        """Value as the contract type (null where unparsable); digits -> zero-padded text."""
        t, c = self.spec["type"], self.raw
        if self.category == "null":
            return pl.lit(None, dtype={"integer": pl.Int64, "boolean": pl.Boolean}.get(t, pl.String))
        if t == "digits":
            return c.cast(pl.String).str.zfill(self.spec["width"]) if self.category == "integer" else c
        if t == "integer":
            return c.str.to_integer(strict=False) if self.category == "string" else c
        if t == "boolean":
            return (c == 1) if self.category == "integer" else c
        return c.cast(pl.String)  # id


@dataclass(frozen=True)
class PreparedTable:
    """An opened input table with its resolved layout and per-column plans."""

    role: str  # "persons" or "units"
    source: ParquetSource
    layout: str
    layout_spec: dict[str, Any] = field(repr=False)
    columns: dict[str, ColumnPlan] = field(repr=False)

    @property
    def label(self) -> str:
        return str(self.source.path)

    def geoid_expr(self) -> pl.Expr:
        """The 15-digit block GEOID (concatenated components in the PPMF layout)."""
        parts = [self.columns[c].parsed() for c in self.layout_spec["geoid"]]
        return parts[0] if len(parts) == 1 else pl.concat_str(parts)

    def target_expr(self, target: str) -> pl.Expr:
        """A normalised attribute (Int32 codes after any recode; Utf8 ids; Boolean flags)."""
        plan = self.columns[self.layout_spec["targets"][target]]
        p = plan.parsed()
        t = plan.spec["type"]
        if t == "integer":
            recode = plan.spec.get("recode")
            if recode:
                return p.replace_strict({int(k): int(v) for k, v in recode.items()},
                                        default=None, return_dtype=pl.Int32).alias(target)
            return p.cast(pl.Int32, strict=False).alias(target)
        if t == "boolean":
            return p.cast(pl.Boolean).alias(target)
        return p.cast(pl.String).alias(target)

    def normalised(self) -> pl.LazyFrame:
        """The lazy normalised frame (``docs/contracts.md``); assumes values were validated."""
        targets = list(self.layout_spec["targets"])
        order = ["geoid"] + targets if self.role == "persons" else ["unit_id", "geoid", "kind", "occupied"]
        exprs = {"geoid": self.geoid_expr().alias("geoid")}
        exprs.update({t: self.target_expr(t) for t in targets})
        return self.source.scan().select([exprs[c] for c in order])


def _resolve_layout(role: str, source: ParquetSource) -> tuple[str | None, list[Problem]]:
    layouts = load_contract()[role]["layouts"]
    cols = set(source.schema)
    hits = {name: sorted(cols & set(spec["columns"])) for name, spec in layouts.items()}
    present = [n for n, h in hits.items() if h]
    label = str(source.path)
    if len(layouts) == 1:
        present = list(layouts)
    if len(present) > 1:
        detail = "columns of more than one layout: " + "; ".join(f"{n}: {', '.join(hits[n])}" for n in present)
        return None, [Problem(label, "", "ambiguous_layout", 1, detail)]
    if not present:
        detail = "none of the layouts' columns found (have: " + ", ".join(sorted(cols)) + "); expected " + \
            " or ".join(f"{n} ({', '.join(s['columns'])})" for n, s in layouts.items())
        return None, [Problem(label, "", "missing_column", len(next(iter(layouts.values()))["columns"]), detail)]
    name = present[0]
    missing = [c for c in layouts[name]["columns"] if c not in cols]
    return name, [Problem(label, c, "missing_column", 1, f"required column of the {name} layout is absent")
                  for c in missing]


def prepare_table(role: str, path: str | Path) -> tuple[PreparedTable | None, list[Problem]]:
    """Open ``path`` as the ``role`` table ("persons" or "units") and plan its columns.

    Checks the file(s), the layout and each contract column's dtype; reads no rows.
    """
    source, problems = open_parquet(path)
    if source is None:
        return None, problems
    layout, problems = _resolve_layout(role, source)
    if layout is None:
        return None, problems
    spec = load_contract()[role]["layouts"][layout]
    plans: dict[str, ColumnPlan] = {}
    for name, cspec in spec["columns"].items():
        if name not in source.schema:
            continue
        dtype = source.schema[name]
        cat = _category(dtype)
        key = "digits+int" if cspec["type"] == "digits" and cspec.get("integers") else cspec["type"]
        if cat not in _ACCEPTED[key]:
            want = {"digits": "a string of digits", "digits+int": "a string of digits or an integer",
                    "integer": "an integer (or integer text)", "boolean": "a boolean (or 0/1 integer)",
                    "id": "a string or integer"}[key]
            if cspec["type"] == "digits" and cat == "integer":
                want += " (a 15-digit GEOID as an integer loses its leading zeros)"
            problems.append(Problem(str(source.path), name, "wrong_type", source.n_rows,
                                    f"column has type {dtype}, expected {want}"))
            continue
        plans[name] = ColumnPlan(name, cspec, cat)
    if problems:
        return PreparedTable(role, source, layout, spec, plans), problems
    return PreparedTable(role, source, layout, spec, plans), []


def _read(role: str, path: str | Path) -> pl.LazyFrame:
    table, problems = prepare_table(role, path)
    if problems or table is None:
        raise InputValidationError(problems)
    return table.normalised()


def read_persons(path: str | Path) -> pl.LazyFrame:
    """Lazy normalised persons: ``geoid`` Utf8 (15 digits), ``hhgq``, ``voting_age``,
    ``hispanic``, ``cenrace`` Int32, from our layout or the PPMF layout.

    Checks files, layout and column types (raises :class:`InputValidationError`), not the
    row values: call :func:`validate_inputs` before trusting the values.
    """
    return _read("persons", path)


def read_units(path: str | Path) -> pl.LazyFrame:
    """Lazy normalised units: ``unit_id`` Utf8, ``geoid`` Utf8 (15 digits), ``kind`` Int32
    (0 housing unit, 1–7 GQ type), ``occupied`` Boolean (null for GQ facilities).

    Checks files, layout and column types only, like :func:`read_persons`.
    """
    return _read("units", path)


def validate_inputs(persons_path: str | Path, units_path: str | Path,
                    spec: "HistogramSpec | None" = None) -> "ValidatedInputs":
    """Validate both inputs completely; see :func:`pipeline.validation.validate_inputs`."""
    from pipeline.validation import validate_inputs as _validate

    return _validate(persons_path, units_path, spec)


# --------------------------------------------------------------------------------------
# writing


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(data: pl.DataFrame | pa.Table, path: str | Path, *,
                         overwrite: bool = True, compression: str = "zstd") -> Path:
    """Write a table to ``path`` so readers see either nothing or the whole file.

    Writes a temp file in the same directory, fsyncs it, then renames it into place (and
    fsyncs the directory). With ``overwrite=False`` an existing ``path`` raises
    :class:`FileExistsError` and is left untouched (hard link: atomic no-clobber).
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: refusing to overwrite an existing file")
    table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_parquet_atomic needs a polars DataFrame or pyarrow Table, got {type(data).__name__}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression=compression)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers
            tmp.unlink()
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
