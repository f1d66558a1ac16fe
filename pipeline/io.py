"""Parquet input and output: input problems, opening input files, readers, atomic writes.

Opens a Parquet file or a directory of part files and checks what can be checked without
reading rows (existence, Parquet magic and footer, identical schemas across parts). The
readers apply the input contract (:mod:`pipeline.contract`, ``schemas/input_contract.yaml``)
and return the normalised lazy frames of ``docs/contracts.md``; row values are checked by
:func:`validate_inputs` (:mod:`pipeline.validation`).

Every problem is reported as a :class:`Problem`; all problems found are raised together in one
:class:`InputValidationError` (the CLI maps it to exit status 2).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from typing import Callable

    from pipeline.spec import HistogramSpec
    from pipeline.validation import ValidatedInputs

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
    parts of a directory, in file-name order) and ``examples`` the matching offending values
    (same length). ``blocks`` describes the first offending blocks of a cross-file check.
    ``column`` is ``""`` for problems of the file as a whole.
    """

    file: str
    column: str
    kind: str
    count: int
    detail: str = ""
    first_rows: tuple[int, ...] = ()
    examples: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()

    def describe(self, values: bool = True) -> str:
        """One line: ``file, column 'c': kind — detail (count N); first rows (0-based): row: value, ...``.

        ``values=False`` leaves out the offending values and blocks (confidential microdata),
        keeping file, column, kind, count and row numbers: safe for logs outside the run.
        """
        col = f", column '{self.column}'" if self.column else ""
        text = f"{self.file}{col}: {self.kind} — {self.detail} (count {self.count:,})"
        if not values:
            if self.first_rows:
                text += "; first rows (0-based): " + ", ".join(str(r) for r in self.first_rows)
            return text
        if self.first_rows and len(self.examples) == len(self.first_rows):
            text += "; first rows (0-based): " + ", ".join(f"{r}: {e}" for r, e in zip(self.first_rows, self.examples))
        elif self.first_rows:
            text += "; first rows (0-based): " + ", ".join(str(r) for r in self.first_rows)
        if self.blocks:
            text += "; blocks: " + ", ".join(self.blocks)
        return text


class InputValidationError(ValueError):
    """The inputs break the contract. ``problems`` lists every problem found (never empty)."""

    exit_status = 2  # the CLI's status for invalid input

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(self.message())

    def message(self, values: bool = True) -> str:
        """Every problem, one per line; ``values=False`` omits data values (see Problem.describe)."""
        n = len(self.problems)
        head = f"invalid input: {n} problem{'s' if n != 1 else ''} found"
        return "\n".join([head] + [f"  - {p.describe(values)}" for p in self.problems])

    def __str__(self) -> str:
        return self.message()


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
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(size - 4, 0))
            tail = fh.read(4)
    except OSError as exc:  # permissions, a directory where a file should be, I/O errors
        return None, 0, [Problem(label, "", "unreadable_file", 1, f"cannot read the file: {first_line(exc)}")]
    if size == 0:
        return None, 0, [Problem(label, "", "zero_byte_file", 1, "the file is empty (0 bytes), not Parquet")]
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
        subdirs = path.is_dir() and any(p.is_dir() for p in path.iterdir())
        return None, [Problem(label, "", "empty_directory", 1, "the directory holds no *.parquet part files"
                              + (" (subdirectories, e.g. Hive partitions, are not searched)" if subdirs else ""))]
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


def _read(role: str, path: str | Path) -> pl.LazyFrame:
    from pipeline.contract import prepare_table  # the contract module builds on this one

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
                    spec: "HistogramSpec | None" = None,
                    on_step: "Callable[[str], None] | None" = None) -> "ValidatedInputs":
    """Validate both inputs completely; see :func:`pipeline.validation.validate_inputs`."""
    from pipeline.validation import validate_inputs as _validate

    return _validate(persons_path, units_path, spec, on_step)


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
