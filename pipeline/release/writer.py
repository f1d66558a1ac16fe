"""The public release folder ``releases/<release-id>/`` (ARCHITECTURE §8).

::

    manifest.json                        id, time, software, config hash, privacy, invariants,
                                         every file with sha256, rows and schema
    index.html                           what is here, how it was protected, how to read it, and
                                         a search for any area (the area explorer)
    explorer/*.js                        the explorer's data, read back from tables/ (pipeline.release.html)
    tables/<table>.parquet               long format: geoid, geolevel, name, table, line,
                                         label, count, moe90 (every level)
    tables/definitions.yaml              the table definitions used (schemas/tables/pl94.yaml)
    tables/<spec>.yaml                   the histogram specs definitions.yaml names (pl94, units)
    README.md, codebook.json             the codebook: every file, table, column, code and label
    csv/<geolevel>/<table>.csv           the same rows, one file per level and table, GEOID as GEO_ID
    microdata/persons.parquet            protected microdata, PPMF layout (pipeline.microdata)
    invariants/block_housing_units.parquet  the declared block housing-unit invariant
    measurements/noisy/run=<run>/geolevel=<level>/shard-NNNNN.parquet  optional: every drawn noisy
                                         answer, the run's measurement files copied, with
    measurements/{queries,answers,units}.parquet  their lookups: variance and σ² per query, answer
                                         labels, unit GEOIDs (pipeline.release.measurements)
    privacy/<kind>.yaml                  the strategy of each run (persons, units), byte copies:
                                         ``dptab verify`` recomputes the privacy section from them

:func:`write_release` builds everything in a hidden temporary directory next to the target,
runs every consistency check (``pipeline.checks``) and the verifier over the written files,
and only then renames the directory into place: a failure leaves no partial release, and an
existing release id is never overwritten (:class:`ReleaseExistsError`).

Memory is bounded by a chunk of units, not by the country: each level is tabulated, checked
and written :data:`STREAM_UNITS` units at a time from histograms read a chunk at a time
(``pipeline.release.tables.histogram_rows``), the hierarchy check keeps only the level above's
counts (:class:`pipeline.release.checks.ReleaseChecks`), the microdata are expanded a chunk of
blocks at a time, and the verifier and the explorer read the files back by record batches. The
bytes do not depend on the chunk: table row groups are cut per :data:`CHUNK_UNITS` units of a
level and every :data:`TABLE_GROUP_ROWS` rows, microdata row groups every :data:`MICRODATA_GROUP_ROWS`
persons.

What may go into a release: only *published* data — the post-processed integer histograms, the
declared invariants, the noisy measurements and the privacy parameters. The writer takes no
confidential histogram and no truth-based metric (those live in the run directory's
``review/``, never here); measurement files are refused unless their columns are exactly
the measurement contract, so a file carrying any extra (e.g. true) column cannot slip in.

The manifest says what the release must hold (``contents``: ``csv``, ``measurements``; the
tables, invariants and runs it lists), how its noise was drawn (``randomness``, and ``seed``
only when seeded) and where each run's strategy copy is (``privacy.runs.<kind>.strategy_file``);
``dptab verify`` checks the folder against all of it.

Which blocks a release shows to exist. Every block of the ``geography`` passed in is published:
a row per block and line in every ``tables/*.parquet`` and ``csv/block/*.csv`` (zero counts
included), the block count in ``manifest.json`` (``geolevels``) and ``index.html``, the block
measurements in ``measurements/`` (every block is measured at the block level), and — only when
declared — ``invariants/block_housing_units.parquet`` with one row per block. Published counts
are post-processed onto exactly these blocks, so even a release without zero rows would show
them. The writer adds nothing beyond the geography and the declared invariants: the housing-unit
file is written only when ``block_housing_units`` is declared, the microdata hold rows only for
published persons, and the margins of error do not depend on which blocks exist. But the block
list *is* the geography: the job builds it from the units file (``pipeline/job/stages.py``,
``stage_inputs``: every block with at least one housing unit or group-quarters facility), so
with ``invariants.block_housing_units`` (or ``gq_facilities``) off a release still reveals
exactly which blocks have at least one housing unit or facility. Only a geography taken from a
public block list (every block of the area, empty ones included) removes that; the writer
cannot, since it sees only the geography it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.files import RowGroups, crash_point, sha256_file
from pipeline.release.checks import CheckFailure, Invariants, ReleaseChecks

if TYPE_CHECKING:
    from pipeline.model.geography import Geography, LevelIndex
from pipeline.release.manifest import (
    CHUNK_UNITS,
    ESTIMATORS,
    MANIFEST_FORMAT,
    ReleaseCheckError,
    ReleaseError,
    ReleaseExistsError,
    ReleaseMetadata,
    _copy_strategies,
    release_margins,
    strategy_file,
    strategy_spec_files,
    variances_from_privacy,
)
from pipeline.release.microdata import microdata_from_blocks
from pipeline.release.streams import Background, WriteQueue
from pipeline.release.tables import (
    CSV_SCHEMA,
    TableDef,
    TableError,
    TableSet,
    csv_frame,
    histogram_rows,
    histogram_shape,
    load_tables,
    long_table,
    tabulate_units,
    unit_names,
)
from pipeline.release.tree import GEOGRAPHY_FILE, CodedGeoids, GeoTree
from pipeline.release.uncertainty import MARGIN_PART_UNITS, Z90, DiskRows, RepeatedRows, simulated_moe90
from pipeline.runtime import return_free_memory


def _file_entry(root: Path, path: Path, rows: int | None = None, sha256: str | None = None) -> dict[str, Any]:
    """The manifest's entry of ``path``; ``sha256``: its digest when the bytes were hashed as
    they were written (else the file is read and hashed here)."""
    entry: dict[str, Any] = {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
                             "sha256": sha256 or sha256_file(path)}
    if path.suffix == ".parquet":
        meta = pq.ParquetFile(path)
        entry["rows"] = int(meta.metadata.num_rows)
        entry["schema"] = {f.name: str(f.type) for f in meta.schema_arrow}
    elif rows is not None:
        entry["rows"] = int(rows)
    if path.suffix == ".csv":
        # header row + one row per (unit, line); the types a reader should apply
        entry["schema"] = {k: str(v) for k, v in CSV_SCHEMA.items()}
    return entry


#: units tabulated, checked and turned into rows at a time: publishing holds one such chunk of a
#: level (plus one row group being filled). The files do not depend on it — row groups are cut
#: by :data:`CHUNK_UNITS` and :data:`TABLE_GROUP_ROWS` alone — so it only trades memory for calls.
STREAM_UNITS = 10_000
#: rows per row group of the table files (at most; also cut per :data:`CHUNK_UNITS` units). Each
#: writer lane makes a group's rows, copies them contiguous and encodes them: with 1 Mi rows the
#: writer's tables phase peaked at 1.85 GB at 30 M persons, 1.43 GB with 256 Ki (session 31)
TABLE_GROUP_ROWS = 1 << 18


class _TableWriter:
    """Streams one table's long rows into its Parquet file and per-level CSV files.

    Row groups as the release format has them: one per chunk of :data:`CHUNK_UNITS` units of a
    level, split at :data:`TABLE_GROUP_ROWS` rows (:meth:`cut` ends a chunk). The units given are
    kept as counts (small) and turned into long rows (text: ~10x larger) only when they complete
    a row group, so each table holds less than one unit's rows between calls — not a partial row
    group per table.

    The CSVs carry the GEOID as a Census-style ``GEO_ID`` (``0500000US01105``; nation
    ``0100000US``) instead of the bare code: a column of digits loses its leading zeros in
    pandas, polars, R and Excel with default settings, and the nation's empty GEOID reads as
    missing (``pipeline.release.tables.census_geo_id``). Everything else is as in the Parquet.

    Threads: :meth:`write`, :meth:`cut` and :meth:`close` hand the work to the writer's lane of
    ``lanes`` (:class:`WriteQueue`), where the rows are made, encoded and written in the order
    given (the caller makes the next units' counts meanwhile; the arrays given must not change
    afterwards). What it wrote (``csv_rows``, the file) is complete once ``lanes`` is waited for.
    """

    def __init__(self, root: Path, table: TableDef, lanes: WriteQueue, csv: bool = True,
                 lookup: bool = False) -> None:
        self.root, self.table, self.name, self.csv, self.lookup = root, table, table.name, csv, lookup
        self.path = root / "tables" / f"{table.name}.parquet"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lanes = lanes
        self.groups = RowGroups(self.path, group_rows=TABLE_GROUP_ROWS)  # written on this writer's lane
        self.written = False
        self.csv_rows: dict[Path, int] = {}
        #: units given but not yet made into rows: (level, geoids, names, counts, moe90)
        self.pending: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.pending_units = 0

    def write(self, level: str, geoids: np.ndarray, names: np.ndarray, counts: np.ndarray,
              moe90: np.ndarray | None) -> None:
        """Append units of ``level``: GEOIDs and names ``(n,)``, counts int64 ``(n, n_lines)``,
        moe90 float ``(n_lines,)`` or ``(n, n_lines)`` or None (as :func:`long_table` takes them)."""
        self.written = True
        self.lanes.submit(self, self._write, level, geoids, names, counts, moe90)

    def cut(self) -> None:
        """End a chunk of :data:`CHUNK_UNITS` units (or a level): its row group ends here."""
        self.lanes.submit(self, self._cut)

    def close(self) -> None:
        self.lanes.submit(self, self._close)

    def _write(self, level: str, geoids: np.ndarray, names: np.ndarray, counts: np.ndarray,
               moe90: np.ndarray | None) -> None:
        self.pending.append((level, geoids, names, counts, moe90))
        self.pending_units += len(geoids)
        n_lines = self.table.n_lines
        while self.groups.rows + self.pending_units * n_lines >= TABLE_GROUP_ROWS:
            need = TABLE_GROUP_ROWS - self.groups.rows
            self._make(-(-need // n_lines))  # the units that complete the row group

    def _make(self, units: int) -> None:
        """Turn the first ``units`` pending units into rows (Parquet row groups, CSV lines)."""
        while units > 0 or (self.pending and not len(self.pending[0][1])):
            level, g, nm, c, m = self.pending[0]
            k = min(units, len(g))
            if k < len(g):
                self.pending[0] = (level, g[k:], nm[k:], c[k:], m if m is None or m.ndim == 1 else m[k:])
            else:
                self.pending.pop(0)
            units -= k
            self.pending_units -= k
            rows = long_table(self.table, level, g[:k], nm[:k], c[:k], m if m is None or m.ndim == 1 else m[:k])
            self.groups.add(rows)
            if self.csv:
                frame = pl.from_arrow(rows)
                assert isinstance(frame, pl.DataFrame)
                self._csv(level, frame)

    def _csv(self, level: str, frame: pl.DataFrame) -> None:
        csv = self.root / "csv" / level / f"{self.name}.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        first = csv not in self.csv_rows
        with open(csv, "a" if not first else "w", newline="") as fh:
            csv_frame(frame, self.lookup).write_csv(fh, include_header=first)
        self.csv_rows[csv] = self.csv_rows.get(csv, 0) + frame.height

    def _cut(self) -> None:
        self._make(self.pending_units)
        self.groups.cut()

    def _close(self) -> None:
        self._make(self.pending_units)
        self.groups.close()


def _chunks(n: int) -> list[tuple[int, int, bool]]:
    """``(start, stop, ends_chunk)`` ranges of at most :data:`STREAM_UNITS` units covering ``n``
    units (one empty range when ``n`` is 0), ``ends_chunk`` where a chunk of :data:`CHUNK_UNITS`
    units (a row group boundary of the table files) or the level ends."""
    out = []
    for c in range(0, max(n, 1), CHUNK_UNITS):
        ce = min(c + CHUNK_UNITS, n)
        for s in range(c, max(ce, c + 1), STREAM_UNITS):
            e = min(s + STREAM_UNITS, ce)
            out.append((s, e, e == ce))
    return out


def _write_measurements(root: Path, levels: Sequence[str], geoids: Sequence[np.ndarray], tables: TableSet,
                        privacy: Mapping[str, Any], files: Mapping[tuple[str, str], Sequence[Path]],
                        copy: Callable[[Path, Path], str] | None) -> list[dict[str, Any]]:
    """Publish the run's measurement files into ``measurements/`` (``pipeline.release.measurements``):
    units numbered in the geography's order (``geoids[i]``: level ``i``'s), σ² and variances from
    the release's own privacy section; each file copied by ``copy`` (the job's: it raises unless
    the bytes are those of the file its stage recorded). Returns the manifest entries of the
    files written (their sha256 made here, off the thread that writes the tables: the copies' as
    they were copied)."""
    from pipeline.model.design import design_from_rho
    from pipeline.release.measurements import MeasurementPublishError, write_measurements

    design = design_from_rho({kind: run["rho_by_level_query"] for kind, run in privacy["runs"].items()})
    try:
        written = write_measurements(root, levels, geoids, design, tables.specs, files, copy)
        return [_file_entry(root, p, sha256=digest) for p, digest in written.items()]
    except MeasurementPublishError as exc:
        raise ReleaseError(str(exc)) from None


def _write_tables(writers: Mapping[str, _TableWriter], ts: TableSet, geography: "Geography", tree: GeoTree,
                  persons: Mapping[str, Any], units: Mapping[str, Any] | None, invariants: Invariants,
                  moe: Mapping[tuple[str, str], np.ndarray | RepeatedRows | DiskRows],
                  simulated: tuple[pl.DataFrame, pl.DataFrame, int] | None) -> list[tuple[str, "LevelIndex", list[str]]]:
    """Tabulate, check and write every level's tables, top to bottom, :data:`STREAM_UNITS` units
    at a time; returns ``(level, its LevelIndex, tables written)`` per level. Raises
    :class:`ReleaseCheckError` when a consistency check fails (after every level is seen).

    Memory: one chunk's tables, int64 ``(STREAM_UNITS, n_lines)`` per table, and their long
    rows; the level above's counts for the hierarchy check (:class:`ReleaseChecks`). The
    histograms are read a chunk of units at a time (:func:`histogram_rows`), and a level's
    GEOIDs are made a chunk at a time from its codes unless the geography holds them already
    (``LevelIndex.geoids_of``: a national block level's strings are ~0.5 GB)."""
    checks = ReleaseChecks(ts, tree, invariants)
    out = []
    for i, lv in enumerate(geography.levels):
        sources = {"persons": persons.get(lv.name), "units": (units or {}).get(lv.name)}
        for kind, src in sources.items():
            if src is not None and histogram_shape(src)[0] != lv.n_units:
                raise TableError(f"{kind} histogram of level {lv.name} has {histogram_shape(src)[0]} units, "
                                 f"geography has {lv.n_units}")
        # the simulated margins' moving cells of this level, per table (filtered once, not per chunk)
        moving = ({t: simulated[1].filter((pl.col("table") == t) & (pl.col("geolevel") == lv.name))
                   for t in ts.tables} if simulated is not None else {})
        checks.begin_level(lv.name, keep=i + 1 < len(geography.levels))
        names_written: list[str] = []
        for s, e, ends_chunk in _chunks(lv.n_units):
            lt = tabulate_units(ts, lv.name, lv.geoids_of(s, e),
                                *(None if src is None else histogram_rows(src, s, e) for src in sources.values()))
            checks.add(lt)
            names = tree.unit_names(lv.name, lt.geoids) if tree.is_lookup else unit_names(lv.name, lt.geoids)
            for name, counts in lt.counts.items():
                m: np.ndarray | None
                if simulated is not None:
                    m = simulated_moe90(simulated[0], moving[name], ts.tables[name], lv.name, counts,
                                        np.arange(s, e))
                else:
                    whole = moe.get((name, lv.name))  # (n_lines,), or per unit (n_units, n_lines) / RepeatedRows
                    m = whole if whole is None or whole.ndim == 1 else whole[s:e]
                writers[name].write(lv.name, lt.geoids, names, counts, m)
                if ends_chunk:
                    writers[name].cut()
            names_written = list(lt.counts)
        checks.end_level()
        out.append((lv.name, lv, names_written))
    failures = checks.failures()
    if failures:
        raise ReleaseCheckError(failures)
    return out


#: persons per row group of ``microdata/persons.parquet``. A microdata row is ~110 bytes of Arrow
#: text, and the process writing them holds the group being filled, its contiguous copy and the
#: group being encoded: at 30 M persons ~0.9 GB above its imports with groups of 1 Mi rows (the
#: table files' size until session 31), ~0.25 GB with these, for a file 0.5% larger
MICRODATA_GROUP_ROWS = 1 << 18
#: blocks expanded into persons at a time (~40 persons a block: a polars frame and its Arrow copy
#: of ~100 k rows); the file does not depend on it
MICRODATA_UNITS = 2_500


def _write_microdata(path: Path, blocks: "LevelIndex", hist: Any, spec: Any, lookup: bool) -> int:
    """Write ``microdata/persons.parquet`` from the published block histogram, :data:`MICRODATA_UNITS`
    blocks at a time (row groups of :data:`MICRODATA_GROUP_ROWS` persons, encoded on a thread of
    their own, one waiting at most); returns the persons written. ``blocks``: the block level (in a
    process of its own it arrives without its GEOID strings, and each chunk's are made from the
    codes).

    Dictionaries only for the text columns (few distinct codes; EPNUM is unique) and zstd level 3:
    smaller than the file polars wrote when the microdata were one frame."""
    io = WriteQueue(limit=1)
    groups = RowGroups(path, io, text_dictionaries=True, group_rows=MICRODATA_GROUP_ROWS)
    n = 0
    try:
        try:
            for s in range(0, max(blocks.n_units, 1), MICRODATA_UNITS):
                e = min(s + MICRODATA_UNITS, blocks.n_units)
                frame = microdata_from_blocks(blocks.geoids_of(s, e), histogram_rows(hist, s, e), spec, lookup, n + 1)
                n += frame.height
                groups.add(frame.to_arrow())
        finally:
            groups.close()
    finally:
        io.close()
    return n


#: releases of at least this many blocks write their microdata and check their data files in
#: processes of their own (when the job has ``workers > 1``); below it starting a process costs
#: more than it saves over a thread of the writer's process
BACKGROUND_MIN_BLOCKS = 20_000
#: niceness added to the check processes: they run beside the explorer, which this process writes
#: alone on one core and which ends last otherwise (the checks done, a core idle for its last
#: seconds); at a lower priority they yield to it and use both cores once it is written
CHECK_NICE = 5


def _without_strings(level: "LevelIndex") -> "LevelIndex":
    """``level`` without its cached GEOID strings (what a child process is sent: 8 bytes a unit)."""
    return dataclasses.replace(level)


def _write_table_files(tmp: Path, spill: Path, ts: TableSet, geography: "Geography", tree: GeoTree,
                       persons: Mapping[str, Any], units: Mapping[str, Any] | None, invariants: Invariants,
                       variances: Mapping[str, Mapping[str, Mapping[str, float]]], estimator: str, csv: bool,
                       workers: int, unbiased: Mapping[tuple[str, str], np.ndarray] | None,
                       simulated: tuple[pl.DataFrame, pl.DataFrame, int] | None
                       ) -> tuple[list[dict[str, Any]], list[tuple[str, int, list[str]]], list[str]]:
    """The margins of error, ``tables/`` (every level's tables, checked as they are made; the
    simulated margins' lookup; the unbiased tables) under the release folder ``tmp``, the
    margins' scratch in ``spill``. Returns the manifest entries of the files written,
    ``(level, units, tables written there)`` per level and the tables with a file; raises
    :class:`ReleaseCheckError` when a consistency check fails."""
    levels = [lv.name for lv in geography.levels]
    digits = {lv.name: lv.digits for lv in geography.levels}
    # the table files' rows are made, encoded and written on lanes of their own (a file always
    # on the same lane) while the next units are tabulated and checked here (see WriteQueue);
    # up to 8 chunks of units wait per lane
    lanes = WriteQueue(limit=8, lanes=max(workers, 1))
    try:
        # the full estimator's per-unit margins (1.4 GB on the US geography) wait in files beside
        # the folder being written (removed with it, or by the next attempt's clean-up) and are
        # read a chunk of units at a time, not held while everything is published
        moe = release_margins(ts, variances, levels, digits, invariants.state_totals is not None,
                              invariants.block_housing_units is not None, estimator,
                              [lv.child_ptr for lv in geography.levels[:-1]], MARGIN_PART_UNITS, spill=spill)
        # the margins' fits are freed by now, but their pages stay in the C heap, where the tables'
        # Arrow and polars buffers (allocators of their own) never reuse them: at 100 M persons
        # the writer went 396 -> 719 MB here with 329 MB of it free, and kept it to the end
        return_free_memory()
        writers = {name: _TableWriter(tmp, t, lanes, csv, tree.is_lookup) for name, t in ts.tables.items()}
        published = _write_tables(writers, ts, geography, tree, persons, units, invariants, moe, simulated)
        for w in writers.values():
            w.close()
        lanes.wait()
        entries: list[dict[str, Any]] = []
        for w in writers.values():
            if w.written:
                entries.append(_file_entry(tmp, w.path))
                entries += [_file_entry(tmp, p, rows) for p, rows in sorted(w.csv_rows.items())]
        if simulated is not None:
            spath = tmp / "margins" / "simulated.parquet"
            spath.parent.mkdir()
            simulated[0].write_parquet(spath, compression="zstd")
            entries.append(_file_entry(tmp, spath))
        if unbiased:
            from pipeline.release.unbiased import write_unbiased

            above = [(name, lv.geoids, names) for name, lv, names in published[:-1]]
            entries += [_file_entry(tmp, p) for p in write_unbiased(tmp, ts, above, unbiased, moe, tree)]
    except BaseException:  # the lanes stopped before the caller removes the folder
        lanes.close(cancel=True)
        raise
    lanes.close()
    return (entries, [(name, lv.n_units, names) for name, lv, names in published],
            [name for name, w in writers.items() if w.written])


def _check_contents(root: Path, manifest: Mapping[str, Any], part: str = "all") -> list[CheckFailure]:
    from pipeline.release.verify_data import verify_contents

    return verify_contents(root, manifest, regenerate=False, part=part)


def _described(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`pipeline.release.verify_data.verify_contents` reads of a manifest: all but the file
    list and the explorer settings (added after the data files are checked)."""
    return {k: v for k, v in manifest.items() if k not in ("files", "explorer")}


#: the manifest's ``uncertainty.method`` per estimator
UNCERTAINTY_METHODS = {
    "topdown": "standard error of the weighted least-squares estimate from the level's own noisy measurements "
               "(data-independent); invariants and structural zeros as exact",
    "simulated": "approximate Monte Carlo: the whole post-processing re-run on fresh noise around the published "
                 "counts (released data only, no budget); moe90 is the 90th percentile of |re-run - published| over "
                 "the re-runs and the areas of a level whose count of the line is in the same size bin "
                 "(0, 1-9, 10-49, 50-249, 250-999, >=1000), with the full estimator after moving the re-run errors "
                 "of a non-zero bin to the bias measured against the unbiased GLS estimate (margins/simulated.parquet, "
                 "column bias); 0 where every re-run reproduced the count; a published "
                 "0 gets the 90th percentile of the positive counts a re-run published as 0 (what a zero hides), "
                 "or 0 where the structural zeros or the declared invariants force the count to 0",
    "full": "exact standard error, per area, of the hierarchical GLS (best linear unbiased) estimate from every "
            "level's noisy measurements (data-independent: design and geography only); structural zeros exact; "
            "an invariant total exact and the area's other lines conditioned on it",
}


def write_release(releases_dir: str | Path, meta: ReleaseMetadata, geography: "Geography", persons: Mapping[str, Any],
                  units: Mapping[str, Any] | None, invariants: Invariants, privacy: Mapping[str, Any], *,
                  variances: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                  measurement_files: Mapping[tuple[str, str], Sequence[Path]] | None = None,
                  copy_measurement_file: Callable[[Path, Path], str] | None = None,
                  tables: str | Path = "pl94", csv: bool = True,
                  unbiased: Mapping[tuple[str, str], np.ndarray] | None = None,
                  simulated: tuple[pl.DataFrame, pl.DataFrame, int] | None = None,
                  before_publish: Callable[[], None] | None = None, workers: int = 1) -> Path:
    """Write ``releases_dir/<meta.release_id>/`` atomically and return its path.

    ``before_publish`` is called once the folder is complete and verified, right before it is
    renamed into place (the job records the spend in the ledger there, so nothing is public
    before the ledger counts it).

    ``geography``: a ``pipeline.geography.Geography``; ``persons[level]`` /
    ``units[level]``: the *published* (post-processed, integer) histograms of every level
    (units: 2 cells vacant/occupied, SparseHistogram or dense ``(n_units, 2)``);
    ``invariants``: the declared public invariants; ``privacy``: :func:`privacy_parameters`;
    ``variances[kind][level][query]``: exact noise variances for margins of error (default:
    :func:`variances_from_privacy`); ``measurement_files[(kind, level)]``: the run's measurement
    Parquet files to publish, each copied by ``copy_measurement_file(src, dst)`` if given (which
    returns the sha256 of the bytes copied and raises if ``src`` is not the file to publish; on
    the thread that copies them); ``csv=False`` skips ``csv/`` (it is ~100x the size of the
    Parquet tables); ``unbiased[(table, level)]``: the full estimator's real-valued line
    estimates, float ``(n_units, n_lines)``, for every level but the bottom one (written to
    ``tables/unbiased/`` with their standard errors); ``simulated``: ``(lookup, moving cells,
    trials)`` of ``pipeline.job.margins`` — the tables' ``moe90`` are then the simulated ones
    and the lookup is published as ``margins/simulated.parquet``; ``workers``: the table files are
    made and written on that many threads (lanes, :class:`WriteQueue`) while this one tabulates
    and checks the next units; with ``workers > 1`` (the job's cores) the release also writes
    its microdata while the tables are written, and checks its data
    files (the verifier's :func:`pipeline.release.verify_data.verify_contents`, the noisy
    measurements' half beside the rest) while the explorer is written, each in a process of its
    own from :data:`BACKGROUND_MIN_BLOCKS` blocks, on a thread below (:class:`Background`): the
    same bytes and checks as in one process. Raises :class:`ReleaseExistsError` if the id exists,
    :class:`ReleaseCheckError` if any consistency check fails (nothing is published then).
    """
    from pipeline.release import html as _html
    from pipeline.release.codebook import release_citation, write_codebook
    from pipeline.release.html import write_explorer, write_index
    from pipeline.release.verify import validate_manifest, verify_release

    releases_dir = Path(releases_dir)
    target = releases_dir / meta.release_id
    if target.exists():
        raise ReleaseExistsError(f"release {meta.release_id!r} already exists at {target}; releases are never overwritten")
    releases_dir.mkdir(parents=True, exist_ok=True)
    tmp = releases_dir / f".{meta.release_id}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)  # nobody else can read a release before the ledger counts it
    spill = tmp.with_name(tmp.name + ".margins")  # the margins' scratch (below): not part of the release
    os.chmod(tmp, 0o700)
    pending: Future[list[dict[str, Any]]] | None = None
    children: list[Background] = []
    try:
        ts = load_tables(tables)
        levels = [lv.name for lv in geography.levels]
        if measurement_files:
            # The measurement files (tens of millions of rows with every answer drawn) are checked
            # and copied alongside the tables: Arrow reads their text codes and the copies run
            # without holding the GIL, and nothing else reads them before the manifest is built
            # (joined there). Their bytes do not depend on the timing.
            # each level's GEOIDs made a range at a time as the units file is written (not the
            # whole block level's strings, ~60 bytes a block, for all of publishing)
            geoids = [lv.geoids if lv.is_lookup else CodedGeoids(lv.codes, lv.digits) for lv in geography.levels]
            pool = ThreadPoolExecutor(1, thread_name_prefix="dptab-measurements")
            pending = pool.submit(_write_measurements, tmp, levels, geoids, ts, privacy, measurement_files,
                                  copy_measurement_file)
            pool.shutdown(wait=False)  # the thread ends with its one task
        digits = {lv.name: lv.digits for lv in geography.levels}
        tree = GeoTree.from_geography(geography)
        # the microdata need only the block histogram: started first, beside everything below
        blocks = geography.levels[-1]
        # with a second core: large releases in processes of their own, smaller ones (and a
        # daemon process, which may not start children) on threads; with one core, in sequence
        background = ("inline" if workers <= 1 else
                      "process" if (blocks.n_units >= BACKGROUND_MIN_BLOCKS
                                    and not multiprocessing.current_process().daemon) else "thread")
        entries: list[dict[str, Any]] = []
        mpath = tmp / "microdata" / "persons.parquet"
        mpath.parent.mkdir()
        microdata = Background("microdata", _write_microdata, (mpath, _without_strings(blocks), persons[blocks.name],
                                                                ts.specs["persons"], tree.is_lookup), background)
        children.append(microdata)
        randomness = meta.randomness_mode()
        privacy = _copy_strategies(tmp, privacy)
        variances = variances if variances is not None else variances_from_privacy(privacy)
        spill.mkdir(mode=0o700)
        if tree.is_lookup:  # the units and their parent codes: how the levels nest (verify reads it)
            gpath = tmp / GEOGRAPHY_FILE
            tree.frame().write_parquet(gpath)
            entries.append(_file_entry(tmp, gpath))
        # made here, not in a process of their own: in the job this process is the driver, and its
        # heap, freed after the levels but not given back, is reused by the tables (a child beside
        # it raised the 30 M job's publishing peak from 2.0 to 2.2 GB, session 35)
        made, published, written = _write_table_files(tmp, spill, ts, geography, tree, persons, units, invariants,
                                                       variances, meta.estimator, csv, workers, unbiased, simulated)
        entries += made
        shutil.rmtree(spill)  # every margin is written
        # the table definitions travel with the release: readers see exactly what each line sums
        defs = tmp / "tables" / "definitions.yaml"
        shutil.copyfile(ts.source, defs)
        entries.append(_file_entry(tmp, defs))
        crash_point("publish:tables-written")
        n_persons = int(microdata.result())
        entries.append(_file_entry(tmp, mpath))
        if invariants.block_housing_units is not None:
            ipath = tmp / "invariants" / "block_housing_units.parquet"
            ipath.parent.mkdir()
            bg = np.asarray(invariants.block_geoids)
            geoid = (pl.Series(bg, dtype=pl.Int64).cast(pl.Utf8).str.zfill(blocks.digits) if bg.dtype.kind in "iu"
                     else pl.Series(bg.astype(str, copy=False), dtype=pl.Utf8))  # codes: made by polars, not numpy
            pl.DataFrame({"geoid": geoid, "housing_units": pl.Series(np.asarray(invariants.block_housing_units),
                                                                     dtype=pl.Int64)}).write_parquet(ipath)
            entries.append(_file_entry(tmp, ipath))
        mfiles = pending.result() if pending is not None else []
        pending = None
        entries += mfiles
        for kind in privacy["runs"]:
            entries.append(_file_entry(tmp, tmp / strategy_file(kind)))
        for rel in strategy_spec_files(privacy):  # a user's spec file a strategy names, copied beside it
            entries.append(_file_entry(tmp, tmp / rel))

        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT, "release_id": meta.release_id, "title": meta.title,
            "created": meta.created, "dataset_id": meta.dataset_id,
            "software": {"name": "dptab", "version": meta.software_version, "git_commit": meta.git_commit},
            "config_hash": meta.config_hash, "randomness": randomness, "seed": meta.seed,
            "joint": {"households": bool(meta.joint_households), "relaxed": bool(meta.joint_relaxed)},
            "estimator": {"name": meta.estimator, "description": ESTIMATORS[meta.estimator],
                          **({"margin_part_units": MARGIN_PART_UNITS} if meta.estimator == "full" else {})},
            "citation": meta.citation or release_citation(meta.title, meta.release_id, meta.created, meta.dataset_id,
                                                          meta.software_version, meta.git_commit, privacy),
            "geolevels": [{"name": lv, "digits": digits[lv], "units": int(n)} for lv, n, _ in published],
            **({"geography": {"kind": "lookup", "file": GEOGRAPHY_FILE}} if tree.is_lookup else {}),
            "tables": [{"name": t.name, "title": t.title, "universe": t.universe, "histogram": t.histogram,
                        "lines": t.n_lines} for t in ts.tables.values() if t.name in written],
            "table_definitions": defs.relative_to(tmp).as_posix(),
            "privacy": dict(privacy),
            "invariants": invariants.to_json(),
            "uncertainty": ({"z": Z90, "level": 0.9, "method": UNCERTAINTY_METHODS[meta.estimator]} if simulated is None
                            else {"z": Z90, "level": 0.9, "method": UNCERTAINTY_METHODS["simulated"],
                                  "trials": int(simulated[2]), "file": "margins/simulated.parquet"}),
            "persons": n_persons,
            # what this release must hold beyond the tables, definitions, microdata, strategies and
            # index.html (dptab verify derives the complete file list from these settings)
            "contents": {"csv": bool(csv), "measurements": bool(mfiles), "unbiased": bool(unbiased)},
            "files": entries,
        }
        # every data file is written and described: check them (tables, microdata, measurements)
        # while the codebook and the explorer are written
        described = copy.deepcopy(_described(manifest))
        return_free_memory()  # what the table lanes and the measurements' copying (threads: malloc arenas) freed
        # with a second core and noisy measurements (tens of millions of rows with the full
        # estimator), their checks run beside the others instead of after them
        split = bool(mfiles) and background != "inline"
        check = Background("release check", _check_contents, (tmp, described, "data" if split else "all"), background,
                           nice=CHECK_NICE)
        children.append(check)
        if split:
            children.append(Background("measurement check", _check_contents, (tmp, described, "measurements"),
                                       background, nice=CHECK_NICE))
        # the codebook (README.md, codebook.json, the specs definitions.yaml refers to) is listed and checksummed
        manifest["files"] += [_file_entry(tmp, p) for p in write_codebook(tmp, manifest, ts)]
        # the area explorer's data (read back from tables/), listed and checksummed like every file
        # the explorer's block files hold at most this many blocks (verify regenerates them alike)
        manifest["explorer"] = {"block_chunk_units": _html.BLOCK_CHUNK_UNITS}
        manifest["files"] += [_file_entry(tmp, p) for p in write_explorer(tmp, manifest)]
        index = write_index(tmp, manifest)
        manifest["files"].append(_file_entry(tmp, index))
        validate_manifest(manifest)
        from pipeline.files import write_json_atomic

        write_json_atomic(tmp / "manifest.json", manifest)
        os.chmod(tmp / "manifest.json", 0o644)
        # `dptab verify` does all, and regenerates the rows and the explorer
        problems = verify_release(tmp, release_id=meta.release_id, regenerate=False, contents=False)
        if _described(manifest) != described:  # what was checked must be what the manifest says
            raise ReleaseError("the manifest changed after its data files were checked")
        for child in children[children.index(check):]:
            problems += child.result()
        if problems:
            raise ReleaseCheckError(problems)
        if target.exists():  # a concurrent writer won the race
            raise ReleaseExistsError(f"release {meta.release_id!r} appeared at {target} while writing; not overwritten")
        if before_publish is not None:
            before_publish()
        crash_point("publish:before-rename")
        os.chmod(tmp, 0o755)  # public from here on: the ledger has counted it
        os.rename(tmp, target)
    except BaseException:
        if pending is not None:  # never delete the folder under a writer still in it
            wait([pending])
        for child in children:
            child.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
        raise
    return target
