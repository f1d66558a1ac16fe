"""A sparse histogram of one geographic level: the value every wing passes around, and its file.

``(unit, cell, count)`` int64 arrays sorted by ``(unit, cell)`` with positive counts only, since
most block cells are zero. The Parquet form (``unit``, ``cell``, ``count`` + level metadata) is
the run directory's histogram file: true histograms (inputs), published histograms (job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.files import ROW_GROUP_ROWS, RowGroups, parquet_stream

if TYPE_CHECKING:
    import scipy.sparse as sp


class HistogramError(InputError):
    """Input to a histogram build is inconsistent (codes out of domain, unknown blocks, bad file)."""


#: entries per row group of a histogram file: a shard's unit range reads only the groups it needs
ROW_GROUP_ENTRIES = ROW_GROUP_ROWS


@dataclass(frozen=True, eq=False)
class SparseHistogram:
    """A histogram of ``n_units`` units × ``n_cells`` cells of one ``level``, stored sparsely.

    ``unit``, ``cell``, ``count``: int64 arrays of equal length ``nnz``, sorted by
    ``(unit, cell)`` without repeats, ``0 <= unit < n_units``, ``0 <= cell < n_cells``,
    ``count > 0``. Construction checks all of this (O(nnz)).
    """

    level: str
    n_units: int
    n_cells: int
    unit: np.ndarray = field(repr=False)
    cell: np.ndarray = field(repr=False)
    count: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("unit", "cell", "count"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.int64))
        object.__setattr__(self, "n_units", int(self.n_units))
        object.__setattr__(self, "n_cells", int(self.n_cells))
        u, c, k = self.unit, self.cell, self.count
        if not (u.ndim == c.ndim == k.ndim == 1 and u.size == c.size == k.size):
            raise HistogramError(f"{self.level}: unit/cell/count must be 1-D of equal length, got "
                                 f"{u.shape}, {c.shape}, {k.shape}")
        if u.size == 0:
            return
        if u[0] < 0 or u[-1] >= self.n_units or c.min() < 0 or c.max() >= self.n_cells:
            raise HistogramError(f"{self.level}: unit or cell index out of range "
                                 f"(n_units={self.n_units}, n_cells={self.n_cells})")
        if k.min() <= 0:
            raise HistogramError(f"{self.level}: {int((k <= 0).sum())} non-positive counts stored")
        du = np.diff(u)
        if (du < 0).any() or ((du == 0) & (np.diff(c) <= 0)).any():
            raise HistogramError(f"{self.level}: entries not sorted by (unit, cell) without repeats")

    @classmethod
    def _trusted(cls, level: str, n_units: int, n_cells: int, unit: np.ndarray, cell: np.ndarray,
                 count: np.ndarray) -> "SparseHistogram":
        """Construct without the O(nnz) checks, for arrays this module built sorted and positive
        (the property tests re-check them through the public constructor)."""
        h = object.__new__(cls)
        for name, value in (("level", level), ("n_units", int(n_units)), ("n_cells", int(n_cells)),
                            ("unit", unit), ("cell", cell), ("count", count)):
            object.__setattr__(h, name, value)
        return h

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) cells."""
        return int(self.count.size)

    def total(self) -> int:
        """Sum of all counts."""
        return int(self.count.sum())

    def totals(self) -> np.ndarray:
        """int64 ``(n_units,)``: the total count of each unit."""
        out = np.zeros(self.n_units, dtype=np.int64)
        if self.nnz:
            starts = np.flatnonzero(np.r_[True, self.unit[1:] != self.unit[:-1]])
            out[self.unit[starts]] = np.add.reduceat(self.count, starts)
        return out

    def unit_ptr(self) -> np.ndarray:
        """int64 ``(n_units + 1,)``: entries of unit ``i`` are ``unit_ptr[i]:unit_ptr[i+1]``."""
        return np.searchsorted(self.unit, np.arange(self.n_units + 1), side="left").astype(np.int64)

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int64 ``(stop - start, n_cells)``: dense rows of units ``start:stop``."""
        stop = self.n_units if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= self.n_units:
            raise HistogramError(f"{self.level}: bad unit range {start}:{stop} of {self.n_units}")
        lo, hi = np.searchsorted(self.unit, [start, stop], side="left")
        out = np.zeros((stop - start, self.n_cells), dtype=np.int64)
        out[self.unit[lo:hi] - start, self.cell[lo:hi]] = self.count[lo:hi]
        return out

    @classmethod
    def from_dense(cls, level: str, x: np.ndarray) -> "SparseHistogram":
        """The sparse form of a dense non-negative integer array ``(n_units, n_cells)``."""
        x = np.asarray(x)
        if x.ndim != 2 or (x < 0).any():
            raise HistogramError(f"{level}: dense histogram must be 2-D and non-negative")
        unit, cell = np.nonzero(x)
        return cls(level, x.shape[0], x.shape[1], unit, cell, x[unit, cell])

    def equals(self, other: "SparseHistogram") -> bool:
        """Same level, shape and entries."""
        return (self.level == other.level and self.n_units == other.n_units
                and self.n_cells == other.n_cells and np.array_equal(self.unit, other.unit)
                and np.array_equal(self.cell, other.cell) and np.array_equal(self.count, other.count))

    def to_parquet(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): columns unit, cell, count (int64); the level,
        n_units and n_cells go into the Parquet key-value metadata."""
        with HistogramWriter(path, self.level, self.n_units, self.n_cells) as w:
            w.add(self)

    @classmethod
    def from_parquet(cls, path: str | Path, units: tuple[int, int] | None = None) -> "SparseHistogram":
        """Read a file written by :meth:`to_parquet` (HistogramError naming the file if it is not one).

        ``units=(start, stop)`` reads only the entries of units ``start:stop`` (unit indices stay
        global, ``n_units`` unchanged), skipping row groups outside the range.
        """
        path = Path(path)
        filters = None if units is None else [("unit", ">=", int(units[0])), ("unit", "<", int(units[1]))]
        try:
            table = pq.read_table(path, filters=filters)
        except (OSError, pa.ArrowException) as exc:
            raise HistogramError(f"{path}: not a readable Parquet histogram ({exc})") from exc
        meta = table.schema.metadata or {}
        try:
            level = meta[b"dptab.level"].decode()
            n_units = int(meta[b"dptab.n_units"])
            n_cells = int(meta[b"dptab.n_cells"])
            cols = [table.column(c).to_numpy() for c in ("unit", "cell", "count")]
        except (KeyError, ValueError) as exc:
            raise HistogramError(f"{path}: missing histogram column or metadata ({exc})") from exc
        try:
            return cls(level, n_units, n_cells, *cols)
        except HistogramError as exc:
            raise HistogramError(f"{path}: {exc}") from exc


class HistogramWriter:
    """:meth:`SparseHistogram.to_parquet` fed in pieces: a level's histogram written a shard at a
    time (``pipeline.job.shard.merge_level``) never held whole. Pieces must come in (unit, cell)
    order, each a valid histogram of the level (HistogramError otherwise). The bytes are those
    of ``to_parquet`` on the whole: row groups of exactly :data:`ROW_GROUP_ENTRIES` entries,
    each written from one contiguous table. Atomic: a temp file, fsynced and renamed on a clean
    exit of the ``with`` block, removed on an error."""

    def __init__(self, path: str | Path, level: str, n_units: int, n_cells: int) -> None:
        self.path = Path(path)
        self.level, self.n_units, self.n_cells = level, int(n_units), int(n_cells)
        self.schema = pa.schema([("unit", pa.int64()), ("cell", pa.int64()), ("count", pa.int64())],
                                metadata={b"dptab.level": level.encode(), b"dptab.n_units": str(self.n_units).encode(),
                                          b"dptab.n_cells": str(self.n_cells).encode()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.groups = RowGroups(self.tmp, schema=self.schema, group_rows=ROW_GROUP_ENTRIES)
        self.last = (-1, -1)  # (unit, cell) of the last entry added

    def add(self, h: SparseHistogram) -> None:
        """Append ``h``'s entries (all after those added before)."""
        if (h.level, h.n_units, h.n_cells) != (self.level, self.n_units, self.n_cells):
            raise HistogramError(f"{self.path}: a piece of {h.level} ({h.n_units} x {h.n_cells}) written into "
                                 f"{self.level} ({self.n_units} x {self.n_cells})")
        if not h.nnz:
            return
        if (int(h.unit[0]), int(h.cell[0])) <= self.last:
            raise HistogramError(f"{self.path}: pieces not in (unit, cell) order")
        self.last = (int(h.unit[-1]), int(h.cell[-1]))
        self.groups.add(pa.table([pa.array(h.unit, pa.int64()), pa.array(h.cell, pa.int64()),
                                  pa.array(h.count, pa.int64())], schema=self.schema))

    def __enter__(self) -> "HistogramWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.groups.close()  # no entries at all: one empty row group, as write_table gives
                with open(self.tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(self.tmp, self.path)
            elif self.groups.writer is not None:
                self.groups.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class HistogramRows:
    """A histogram file (:meth:`SparseHistogram.to_parquet`) read a range of units at a time
    (``pipeline.release.tables.RowSource``): publishing reads each level's published histogram
    this way, so it never holds a whole level.

    Ranges asked for in increasing order (how the release writer and the microdata go through a
    level) are read on from where the last one stopped, a record batch at a time, so each entry
    of the file is decoded once; any other range is read by itself (the row groups holding it).
    The reading state is not pickled: a copy in another process starts afresh."""

    #: entries per record batch of the sequential read
    BATCH = 1 << 17

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            meta = pq.ParquetFile(self.path).schema_arrow.metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise HistogramError(f"{path}: not a readable Parquet histogram ({exc})") from exc
        try:
            self.level = meta[b"dptab.level"].decode()
            self.n_units = int(meta[b"dptab.n_units"])
            self.n_cells = int(meta[b"dptab.n_cells"])
        except (KeyError, ValueError) as exc:
            raise HistogramError(f"{path}: missing histogram metadata ({exc})") from exc
        self._reset()

    def _reset(self) -> None:
        self._batches: Any = None                  # the file's record batches, from the start
        self._buf: list[np.ndarray] = []           # (unit, cell, count) read but not yet returned
        self._next = 0                             # units below this have been returned
        self._last = (-1, -1)                      # (unit, cell) of the last entry read

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "level": self.level, "n_units": self.n_units, "n_cells": self.n_cells}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Units ``start:stop`` as csr int64 ``(stop - start, n_cells)``."""
        import scipy.sparse as sp

        h = self.entries(start, stop)
        return sp.csr_matrix((h.count, (h.unit - start, h.cell)), shape=(stop - start, self.n_cells), dtype=np.int64)

    def entries(self, start: int, stop: int) -> SparseHistogram:
        """The entries of units ``start:stop`` as a histogram of the file's level (unit indices
        global, as :meth:`SparseHistogram.from_parquet` with ``units``)."""
        if start < self._next:  # not the next range: read it by itself, and start afresh
            self._reset()
            return SparseHistogram.from_parquet(self.path, (start, stop))
        unit, cell, count = self._take(start, stop)
        self._next = stop
        return SparseHistogram._trusted(self.level, self.n_units, self.n_cells, unit, cell, count)

    def _take(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of units ``start:stop`` from the sequential read (entries sorted by unit,
        as the histogram files are written; checked batch by batch)."""
        if self._batches is None:
            self._batches = parquet_stream(self.path).iter_batches(self.BATCH, columns=["unit", "cell", "count"])
            self._buf = [np.zeros(0, np.int64)] * 3
        # read on until an entry at or past `stop` (or the end of the file) is in the buffer
        while not (self._buf[0].size and self._buf[0][-1] >= stop):
            batch = next(self._batches, None)
            if batch is None:
                break
            # the checks of SparseHistogram (ranges, positive counts, sorted by (unit, cell)) per
            # batch, and the order across batches
            try:
                h = SparseHistogram("", self.n_units, self.n_cells, *(batch.column(k).to_numpy() for k in range(3)))
            except HistogramError as exc:
                raise HistogramError(f"{self.path}: {exc}") from None
            if not h.unit.size:
                continue
            if (int(h.unit[0]), int(h.cell[0])) <= self._last:
                raise HistogramError(f"{self.path}: entries not sorted by (unit, cell) without repeats")
            self._last = (int(h.unit[-1]), int(h.cell[-1]))
            self._buf = [np.concatenate([b, c]) for b, c in zip(self._buf, (h.unit, h.cell, h.count))]
        unit = self._buf[0]
        lo, hi = np.searchsorted(unit, [start, stop], side="left")
        out = unit[lo:hi], self._buf[1][lo:hi], self._buf[2][lo:hi]
        self._buf = [b[hi:] for b in self._buf]
        return out
