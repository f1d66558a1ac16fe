"""Input problems: one :class:`Problem` per kind of fault in one column of one file, all
raised together in one :class:`InputValidationError` (exit status 2)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from pipeline.errors import InputError

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


class InputValidationError(InputError):
    """The inputs break the contract. ``problems`` lists every problem found (never empty)."""


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


