"""Files: atomic writes, checksums and crash points, for every wing that writes.

Readers never see a partial file: everything is written to a temp file in the target
directory, fsynced, and renamed into place (then the directory is fsynced).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

#: Fault injection for the kill-and-resume tests: when this environment variable names a
#: crash point, the process SIGKILLs itself there (nothing is flushed or cleaned up), exactly
#: like an operator's ``kill -9`` or a lost machine at that instant.
CRASH_ENV = "DPTAB_CRASH_AT"


_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die at ``name`` if the crash-test variable asks for it (no-op otherwise).

    The variable is ``name`` (die at the first hit) or ``name#k`` (die at the k-th hit).
    """
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    target, _, nth = want.partition("#")
    if target != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point(f"mid-write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` via a temp file + fsync + rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(data: pl.DataFrame | pa.Table, path: str | Path, *,
                         overwrite: bool = True, compression: str = "zstd",
                         row_group_size: int | None = None) -> Path:
    """Write a table to ``path`` so readers see either nothing or the whole file
    (``row_group_size``: rows per row group, default pyarrow's 1 Mi).

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
            pq.write_table(table, fh, compression=compression, row_group_size=row_group_size)
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


#: rows per Parquet row group of the files written through :class:`RowGroups` (the table files,
#: the microdata, the merged histograms): pyarrow's default maximum
ROW_GROUP_ROWS = 1 << 20


class RowGroups:
    """A ``pq.ParquetWriter`` fed tables of any size that writes row groups of exactly
    ``group_rows`` rows (:data:`ROW_GROUP_ROWS` by default), also cut wherever :meth:`cut` is
    called: the file's bytes depend only on its rows and the cuts, never on how the rows were
    chunked on their way in (each row group is written from one contiguous table, so pages and
    dictionaries come out the same as ``pq.write_table`` of the whole gives).

    ``schema``: the file's schema if known up front (then a file given no rows gets one empty row
    group of it, as ``pq.write_table`` of an empty table gives); else the first table's.
    ``text_dictionaries``: dictionary-encode only the text columns, zstd level 3 (the
    microdata: few distinct codes per text column, a unique EPNUM); else pyarrow's defaults
    with zstd. ``io``: an object with ``submit(key, fn, *args) -> Future`` (the release's
    ``WriteQueue``) to write the row groups on, e.g. on a thread while the caller makes the next
    rows; ``None``: written in the caller."""

    def __init__(self, path: str | Path, io: Any = None, text_dictionaries: bool = False,
                 schema: pa.Schema | None = None, group_rows: int | None = None) -> None:
        self.path, self.text_dictionaries, self.io, self.schema = Path(path), text_dictionaries, io, schema
        self.group_rows = int(group_rows or ROW_GROUP_ROWS)
        self.writer: pq.ParquetWriter | None = None
        self.parts: list[pa.Table] = []
        self.rows = 0
        self.writes: list[Any] = []  # futures of the row groups queued on ``io``

    def add(self, table: pa.Table) -> None:
        """Queue ``table``'s rows; write every full row group."""
        self.parts.append(table)
        self.rows += table.num_rows
        while self.rows >= self.group_rows:
            self._flush(self.group_rows)

    def cut(self) -> None:
        """End the current row group here (if it has rows)."""
        if self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        buf = pa.concat_tables(self.parts) if len(self.parts) > 1 else self.parts[0]
        head, rest = buf.slice(0, n), buf.slice(n)
        if self.writer is None:
            self.writer = self._open(head.schema)
        if self.io is None:
            self._write_group(self.writer, head)
        else:
            self.writes = [w for w in self.writes if not w.done()]  # (a failed one raised in submit)
            self.writes.append(self.io.submit(self.writer, self._write_group, self.writer, head))
        self.parts = [rest.combine_chunks()] if rest.num_rows else []
        self.rows = rest.num_rows

    def _write_group(self, writer: pq.ParquetWriter, table: pa.Table) -> None:
        writer.write_table(table.combine_chunks(), row_group_size=self.group_rows)

    def _open(self, schema: pa.Schema) -> pq.ParquetWriter:
        if not self.text_dictionaries:  # pyarrow's defaults: the table files' format
            return pq.ParquetWriter(self.path, schema, compression="zstd")
        text = [f.name for f in schema if pa.types.is_large_string(f.type) or pa.types.is_string(f.type)]
        return pq.ParquetWriter(self.path, schema, compression="zstd", compression_level=3, use_dictionary=text)

    def close(self) -> None:
        """Write what is queued and close the file (a file of no rows still gets its schema:
        ``schema``'s, else that of the empty tables given; no file if neither is known)."""
        try:
            self.cut()
        finally:
            for w in self.writes:  # every queued row group is written (or its error raised) first
                w.result()
            self.writes = []
        if self.writer is None and (self.parts or self.schema is not None):
            empty = self.parts[0] if self.parts else pa.Schema.empty_table(self.schema)
            self.writer = self._open(empty.schema)
            self.writer.write_table(empty)
        if self.writer is not None:
            self.writer.close()


#: dictionary indices of :func:`repeated_text` columns per index type, sliced (made once per
#: process, grown to the largest request up to ``_ZEROS_KEPT`` entries; larger requests get their own)
_ZEROS: dict[str, np.ndarray] = {}
_ZEROS_KEPT = 1 << 22


def repeated_text(text: str, n: int, value_type: pa.DataType | None = None,
                  index_type: type[np.signedinteger] = np.int32) -> pa.DictionaryArray:
    """A text column of ``n`` rows all equal to ``text``, dictionary-encoded: one dictionary
    entry and zero indices, so no per-row string is built (a Parquet writer encodes it as one
    run). ``value_type``: the dictionary's string type (default ``pa.string()``);
    ``index_type``: the indices' numpy type (int8 is the cheapest to write, where no Arrow
    schema is stored with the file to record it)."""
    key = np.dtype(index_type).name
    zeros = _ZEROS.get(key, np.zeros(0, index_type))
    if n > zeros.size:
        if n > _ZEROS_KEPT:
            zeros = np.zeros(n, index_type)
        else:
            zeros = _ZEROS[key] = np.zeros(_ZEROS_KEPT, index_type)
    # safe=False: every index is 0 and the dictionary has that one entry, so Arrow's check of
    # each index against the dictionary (~0.6 ns a row, a measurement file writes two such
    # columns for every answer) can find nothing
    return pa.DictionaryArray.from_arrays(pa.array(zeros[:n]), pa.array([text], value_type), safe=False)


def copy_file_sha256(src: str | Path, dst: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Copy ``src`` to a new file ``dst`` byte for byte and return the hex sha256 of the bytes
    written: one read of ``src`` both checks and copies it (a copy followed by a hash of either
    file reads the bytes twice)."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buf):
            h.update(view[:n])
            fout.write(view[:n])
    return h.hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


_PRIVATE_LOCK = threading.Lock()
_private_depth = 0
_saved_umask = 0o022


@contextmanager
def private_files() -> Iterator[None]:
    """Files and directories created inside are readable by their owner only (0600 / 0700).

    Used while a stage writes confidential files (true histograms, noisy measurements,
    invariants, solved histograms) into the run directory; sets the process umask, so it also
    covers files written by libraries (pyarrow, polars). The umask is process-wide, so nested or
    concurrent users (shard tasks on threads) share one count: it is restored only when the
    last of them leaves, never under another's feet."""
    global _private_depth, _saved_umask
    with _PRIVATE_LOCK:
        if _private_depth == 0:
            _saved_umask = os.umask(0o077)
        _private_depth += 1
    try:
        yield
    finally:
        with _PRIVATE_LOCK:
            _private_depth -= 1
            if _private_depth == 0:
                os.umask(_saved_umask)


#: the reader threads of :func:`read_ahead` (started on first use; a forked child starts its own)
_READER: Any = None


def _forget_reader() -> None:
    global _READER
    _READER = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_reader)

_END = object()
T = TypeVar("T")
R = TypeVar("R")


def _next_of(items: Iterator[Any], convert: Callable[[Any], Any] | None) -> Any:
    item = next(items, _END)
    return item if item is _END or convert is None else convert(item)


def parquet_stream(path: str | Path, read_dictionary: list[str] | None = None) -> pq.ParquetFile:
    """``path`` opened for reading on in order (``iter_batches``) without keeping what was read.
    pyarrow's default ``pre_buffer=True`` caches every column chunk an ``iter_batches`` has read
    until the iterator is gone, so a pass over a whole file held its compressed bytes to the end:
    the release check's pass over the table files climbed 0.6 → 0.69 GB at 30 M persons (0.78 →
    1.1 GB at 100 M) through the block level; without it 0.55 → 0.60 GB, as fast."""
    return pq.ParquetFile(path, read_dictionary=read_dictionary, pre_buffer=False)


def read_ahead(items: Iterator[T], convert: Callable[[T], R] | None = None) -> Iterator[R]:
    """``convert(item)`` for each of ``items`` (or the items themselves), in order, the next one
    fetched (and converted) on a reader thread while the caller works on this one: for reading a
    large file by row groups or record batches, whose decoding (Arrow, polars) runs without the
    GIL. One item ahead per iterator; ``items`` is only ever advanced by one call at a time. An
    iterator abandoned part-way leaves at most one read finishing on the thread."""
    global _READER
    if _READER is None:
        from concurrent.futures import ThreadPoolExecutor

        _READER = ThreadPoolExecutor(2, thread_name_prefix="dptab-read")
    ahead = _READER.submit(_next_of, items, convert)
    while True:
        item = ahead.result()
        if item is _END:
            return
        ahead = _READER.submit(_next_of, items, convert)
        yield item
