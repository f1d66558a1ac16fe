"""Opening Parquet inputs: a file or a directory of part files, checked without reading rows.

Checks existence, the Parquet magic and footer, and identical schemas across parts; every fault
is a :class:`pipeline.inputs.problems.Problem`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.inputs.problems import READ_ERRORS, Problem, first_line

PARQUET_MAGIC = b"PAR1"


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
    if f.exists() and not f.is_file():
        # a FIFO, socket or device would block or stream forever: refuse before opening it
        return None, 0, [Problem(label, "", "not_regular_file", 1,
                                 "not a regular file (a pipe, socket or device); give a Parquet file")]
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


