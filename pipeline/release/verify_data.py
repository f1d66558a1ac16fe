"""The checks of a release that read its data files (``dptab verify``'s bulk; the entry point
and the checks of the folder itself — manifest, checksums, file list, privacy section, identity,
explorer — are in :mod:`pipeline.release.verify`).

:func:`verify_contents` re-reads the tables, the microdata, the declared invariants, the noisy
measurements and the unbiased estimates, a chunk of units or a row group at a time, and checks
them against each other, the manifest's description of them, the design and the geography: the
layout of every table's rows, the consistency checks and invariants, the microdata re-tabulated
to the block tables, every row regenerated from its counts (``regenerate``), the measurements
against the design. It reads only what the manifest says about the data, never its file list,
so the release writer runs it in a process of its own while it writes the explorer.

Also the verifier's small helpers: :func:`fail` (a failure without counts), :func:`guard` (a
damaged file reported as a failure, not raised) and :func:`by_content` (loaders memoised on a
file's bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence, cast

import numpy as np
import polars as pl

from pipeline.errors import DptabError
from pipeline.files import parquet_stream
from pipeline.model.geography import format_geoids, parse_geoids
from pipeline.model.geonames import unit_names
from pipeline.release import tree as geotree
from pipeline.release.checks import CheckFailure, Invariants
from pipeline.release.microdata import MicrodataError, histogram_from_microdata
from pipeline.release.tables import (
    CSV_SCHEMA,
    LevelTables,
    RowStream,
    TableSet,
    csv_frame,
    frames_ahead,
    level_runs,
    load_tables,
    long_frame,
    tabulate,
)
from pipeline.release.tree import CodedGeoids, GeoTree, read_tree


def fail(check: str, detail: str, table: str = "*", geolevel: str = "", geoid: str = "") -> CheckFailure:
    return CheckFailure(check, table, None, geolevel, geoid, detail=detail)


def _first_geoids(path: Path, runs: Sequence[tuple[str, int]], n_lines: int, tree: GeoTree
                  ) -> dict[str, "np.ndarray | CodedGeoids"]:
    """The GEOID of the first row of every unit (every ``n_lines``-th row of each level's run),
    per level: the units a table publishes, in file order, read a batch of rows at a time.

    The bottom level of a digit-prefix release (the blocks: most of the units) is kept as its
    codes (:class:`CodedGeoids`, 8 bytes a unit instead of 60), when every one of its GEOIDs is a
    GEOID of its level's digits in sorted order; else as strings, like the other levels, so that
    the checks report what is wrong with them."""
    parts: dict[str, list[np.ndarray]] = {lv: [] for lv, _ in runs}
    bottom = runs[-1][0] if runs and not tree.is_lookup and runs[-1][0] in tree.digits else None
    coded = bottom is not None
    bounds = np.cumsum([0] + [n for _, n in runs])
    offset = 0
    # read as dictionary indices: only one row in n_lines becomes a string
    for batch in parquet_stream(path, read_dictionary=["geoid"]).iter_batches(batch_size=1 << 20, columns=["geoid"]):
        col = batch.column(0)
        for k, (lv, _) in enumerate(runs):
            lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + len(col))
            if lo >= hi:
                continue
            first = lo + (-(lo - bounds[k])) % n_lines  # the next row that starts a unit
            if first < hi:
                taken = pl.Series(col.take(np.arange(first - offset, hi - offset, n_lines))).cast(pl.Utf8)
                if lv == bottom and coded:
                    codes, valid = parse_geoids(taken.to_numpy(), tree.digits[lv])
                    if valid.all():
                        parts[lv].append(codes)
                        continue
                    coded = False  # a malformed GEOID: the level's strings as published
                    parts[lv] = [format_geoids(c, tree.digits[lv]) for c in parts[lv]]
                parts[lv].append(taken.to_numpy().astype(str))
        offset += len(col)
    out: dict[str, np.ndarray | CodedGeoids] = {
        lv: np.concatenate(p) if p else np.zeros(0, dtype=str) for lv, p in parts.items()}
    if bottom is not None and coded:
        codes = cast(np.ndarray, out[bottom])
        if codes.size < 2 or bool(np.all(codes[1:] > codes[:-1])):
            out[bottom] = CodedGeoids(codes.astype(np.int64, copy=False), tree.digits[bottom])
        else:  # out of order or repeated: the order checks report it on the strings
            out[bottom] = format_geoids(codes, tree.digits[bottom])
    return out


class BlockCounts:
    """The microdata re-tabulated per block, for the checks: each persons check line's per-block
    sums (:attr:`lines`) and the block histogram a range of blocks at a time (:meth:`rows`).

    The histogram's entries go, batch by batch as the one pass over the file makes them, to an
    anonymous scratch file (``(unit, cell, count)`` int32 triples; unlinked at once, gone when
    :meth:`close` or the process ends; never in the release folder), and a range of blocks is
    read back from it. Why: holding them (12 bytes an entry, ~0.55 GB at 100 M persons, ~1.8 GB
    for the US) was the data check's one country-sized object, and reading the microdata again
    would cost the re-tabulation twice. Microdata written by the release writer are in block
    order, so a range is in a few consecutive batches; a file in any other order is still
    checked, from the whole matrix built on first use.

    ``vectors``: each check line's 0/1 cell vector ``(n_cells,)``."""

    ENTRY = np.dtype([("unit", "<i4"), ("cell", "<i4"), ("count", "<i4")])

    def __init__(self, n_blocks: int, n_cells: int, vectors: Mapping[str, np.ndarray]) -> None:
        import tempfile

        self.n_blocks, self.n_cells = n_blocks, n_cells
        self.vectors = {name: np.asarray(v, dtype=np.int64) for name, v in vectors.items()}
        #: int64 ``(n_blocks,)`` per check line: each block's count of the line's cells
        self.lines = {name: np.zeros(n_blocks, np.int64) for name in self.vectors}
        self.file = tempfile.TemporaryFile(prefix="dptab-block-counts-")
        self.first: list[int] = []  # each batch's smallest and largest unit
        self.last: list[int] = []
        self.offset: list[int] = [0]  # entries before each batch
        self.ordered = True  # every batch's units at or after the previous batch's
        self._whole: Any = None

    def add(self, unit: np.ndarray, cell: np.ndarray, count: np.ndarray) -> None:
        """One batch's entries, sorted by unit (a block may continue in the next batch)."""
        if not unit.size:
            return
        if int(count.max()) > np.iinfo(np.int32).max:  # (a block of 2^31 persons of one cell)
            raise MicrodataError("a block cell of more than 2^31 persons in the microdata")
        lo, hi = int(unit[0]), int(unit[-1])
        if self.last and lo < self.last[-1]:
            self.ordered = False
        for name, v in self.vectors.items():  # summed over the batch's own block range only
            w = count * v[cell]
            self.lines[name][lo:hi + 1] += np.bincount(unit - lo, weights=w, minlength=hi - lo + 1).astype(np.int64)
        rec = np.empty(unit.size, self.ENTRY)
        rec["unit"], rec["cell"], rec["count"] = unit, cell, count
        rec.tofile(self.file)
        self.first.append(lo)
        self.last.append(hi)
        self.offset.append(self.offset[-1] + unit.size)

    def _read(self, a: int, b: int) -> np.ndarray:
        """The entries of batches ``a:b`` (consecutive in the scratch file)."""
        n = self.offset[b] - self.offset[a] if b > a else 0
        if not n:
            return np.zeros(0, self.ENTRY)
        self.file.seek(self.offset[a] * self.ENTRY.itemsize)
        return np.fromfile(self.file, self.ENTRY, n)

    def rows(self, start: int, stop: int) -> Any:
        """Blocks ``start:stop``: csr ``(stop - start, n_cells)`` (a block split between
        batches: its entries added up)."""
        import scipy.sparse as sp

        if not self.ordered:
            if self._whole is None:
                e = self._read(0, len(self.first))
                self._whole = sp.csr_matrix((e["count"], (e["unit"], e["cell"])), shape=(self.n_blocks, self.n_cells))
            return self._whole[start:stop]
        # the batches whose unit range meets [start, stop): consecutive, found by bisection
        a = int(np.searchsorted(np.asarray(self.last), start, side="left"))
        b = int(np.searchsorted(np.asarray(self.first), stop, side="left"))
        e = self._read(a, max(a, b))
        keep = (e["unit"] >= start) & (e["unit"] < stop)
        e = e[keep]
        return sp.csr_matrix((e["count"], (e["unit"] - start, e["cell"])), shape=(stop - start, self.n_cells))

    def close(self) -> None:
        self.file.close()


def _microdata_entries(path: Path, spec: Any, block_geoids: "np.ndarray | CodedGeoids"
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(unit, cell, count)`` of ``microdata/persons.parquet`` a batch of 256 Ki persons at a
    time, in file order (:func:`pipeline.release.microdata.histogram_from_microdata`)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    # only the columns the re-tabulation reads (EPNUM, RTYPE and TABBLKGRPCE are most of the decoding)
    names = f.schema_arrow.names
    wanted = (["geoid", *(a.name for a in spec.attributes)] if "geoid" in names else
              ["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK", "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE"])
    # the PPMF geography columns as categories: a few distinct values per batch, decoded once
    cats = [c for c in ("TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK") if c in names]
    f = parquet_stream(path, read_dictionary=cats)
    for persons in frames_ahead(f.iter_batches(batch_size=1 << 18, columns=[c for c in wanted if c in names])):
        yield histogram_from_microdata(persons, block_geoids, spec)


def _microdata_counts(root: Path, ts: TableSet, geo: Sequence[LevelTables], tree: GeoTree, manifest_persons: int,
                      blocks: bool, parents: bool) -> tuple[Any, dict[str, Any], list[CheckFailure]]:
    """What the checks need of ``microdata/persons.parquet``, re-tabulated in one pass a batch
    of persons at a time (``geo``: the published units of every level, the blocks last):

    - with ``blocks``, :class:`BlockCounts`: the persons check lines per block, and the block
      histogram (in a scratch file) a range of blocks at a time;
    - with ``parents``, the support of the published histogram of every level above the blocks,
      ``support[level]``: csr int8 ``(n_units, n_cells)``, 1 exactly where the level's histogram
      (the microdata summed up the hierarchy; counts are positive) is positive — summed into the
      blocks' parents batch by batch, so the block histogram is never held for it.

    Returns ``(block counts or None, support, failures)``; ``(None, {}, failures)`` when the file is
    missing, unreadable, of another size than the manifest says, or holds persons of unpublished
    blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    path = root / "microdata" / "persons.parquet"
    if not path.is_file():
        return None, {}, [fail("file_missing", "microdata/persons.parquet (every release carries its microdata)")]
    spec, block = ts.specs["persons"], geo[-1]
    n_blocks, n_cells = len(block.geoids), spec.n_cells
    g = block.geoids  # (the blocks' codes in a digit-prefix release: CodedGeoids)
    x_block = (BlockCounts(n_blocks, n_cells, {c.name: c.vector for c in ts.check_lines.values()
                                               if c.histogram == "persons"})
               if blocks else None)
    # the blocks' parents: position of each block's parent, and per batch the distinct
    # (parent, cell) keys it touches (the support; a count is never 0)
    up = geo[-2] if parents and len(geo) > 1 else None
    if up is not None:
        pos, found = tree.parent_positions(up.level, up.geoids, block.level, g)
        ppos = np.where(found, pos, -1)  # orphans (reported by the hierarchy checks) count nowhere
    keys: list[np.ndarray] = []
    try:
        n_rows = pq.ParquetFile(path).metadata.num_rows
        if n_rows != manifest_persons:
            return None, {}, [fail("microdata", f"{n_rows} microdata rows, manifest says {manifest_persons} persons")]
        for unit, cell, count in _microdata_entries(path, spec, g):
            if x_block is not None:
                x_block.add(unit, cell, count)
            if up is not None:
                p = ppos[unit]
                keys.append(np.unique(p[p >= 0] * n_cells + cell[p >= 0]))
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
        return None, {}, [fail("unreadable", f"microdata/persons.parquet: {exc}")]
    except (MicrodataError, ValueError) as exc:
        return None, {}, [fail("microdata", str(exc))]
    support: dict[str, Any] = {}
    if up is not None:
        k = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        below = sp.csr_matrix((np.ones(k.size, np.int8), (k // n_cells, k % n_cells)), shape=(len(up.geoids), n_cells))
        support[up.level] = below
        for i in range(len(geo) - 3, -1, -1):  # up the levels: a parent's cell is positive where a child's is
            below = _aggregate(below, geo[i + 1], geo[i], tree)
            below.data[:] = 1
            below = below.astype(np.int8)
            support[geo[i].level] = below
    return x_block, support, []


#: the parts :func:`verify_contents` can be split into (each reads what it needs itself)
CONTENT_PARTS = ("all", "data", "measurements")


def verify_contents(root: Path, manifest: Mapping[str, Any], regenerate: bool = True,
                    part: str = "all") -> list[CheckFailure]:
    """The checks of :func:`verify_release` that read the data files of the release folder
    ``root`` (the tables against their layout, the hierarchy and the invariants; the microdata
    against the block tables; the noisy measurements and unbiased estimates against the design
    and the geography), with ``manifest`` as parsed (a schema-valid manifest dict). Reads only
    the manifest's ``table_definitions``, ``tables``, ``geolevels``, ``geography``,
    ``persons``, ``invariants``, ``contents``, ``privacy``, ``estimator`` and ``uncertainty``:
    not the file list, the codebook or the explorer, so it can run before those are written.

    ``part``: ``"all"``; or the two halves the release writer runs side by side — ``"data"``
    (everything but the noisy measurement files) and ``"measurements"`` (only their checks;
    what both read first, e.g. the microdata, is reported by ``"data"``): together exactly the
    failures of ``"all"``."""
    if part not in CONTENT_PARTS:
        raise ValueError(f"verify_contents part {part!r}: one of {CONTENT_PARTS}")
    failures = guard("unreadable", _verify_contents, root, manifest, regenerate, part)
    # the measurements half: only its own checks (the other half reports what both read first)
    return [f for f in failures if f.check == "measurements"] if part == "measurements" else failures


#: (loader, sha256 of the file) -> what it loaded: a verifier process (the writer's self-check,
#: a test suite) reads the same definitions and strategies again and again
_LOADED: dict[tuple[str, str], Any] = {}


def by_content(loader: Callable[[Path], Any], path: Path) -> Any:
    """``loader(path)``, memoised on the file's bytes (the package's specs and geolevels, which
    loaders also read, do not change within a process)."""
    from pipeline.files import sha256_file

    key = (f"{loader.__module__}.{loader.__qualname__}", sha256_file(path))
    if key not in _LOADED:
        if len(_LOADED) > 64:
            _LOADED.clear()
        _LOADED[key] = loader(path)
    return _LOADED[key]


def guard(check: str, fn: Callable[..., list[CheckFailure]], *args: Any) -> list[CheckFailure]:
    """``fn(*args)``, with a damaged or malformed file reported as one failure instead of raised."""
    try:
        return fn(*args)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ArithmeticError, pl.exceptions.PolarsError,
            DptabError) as exc:
        # a damaged file (usually already reported by its checksum) must not hide other failures
        return [fail(check, f"{fn.__name__.lstrip('_')} stopped: {type(exc).__name__}: {exc}")]


def _verify_contents(root: Path, manifest: Mapping[str, Any], regenerate: bool = True,
                     part: str = "all") -> list[CheckFailure]:
    failures: list[CheckFailure] = []
    defs = root / manifest["table_definitions"]
    if root.resolve() not in defs.resolve().parents or not defs.is_file():
        return [fail("file_missing", f"table definitions {manifest['table_definitions']} not found in the release")]
    ts = by_content(load_tables, defs.resolve())
    failures += _table_list_checks(ts, manifest)
    try:
        digits = read_tree(root, manifest)
    except (OSError, pl.exceptions.PolarsError, KeyError) as exc:
        return failures + [fail("geography", f"{(manifest.get('geography') or {}).get('file')}: cannot read the "
                                              f"published geography ({exc})")]
    failures += _geography_checks(digits, manifest)
    tables = [t for t in ts.tables.values() if t.name in {m["name"] for m in manifest["tables"]}]
    levels = [g["name"] for g in manifest["geolevels"]]
    runs: dict[str, dict[str, int]] = {}
    for t in tables:
        path = root / "tables" / f"{t.name}.parquet"
        if not path.is_file():
            failures.append(fail("file_missing", f"tables/{t.name}.parquet (listed in the manifest's tables)", t.name))
            continue
        r = level_runs(path)
        order = [lv for lv, _ in r]
        if order != [lv for lv in levels if lv in order] or len(set(order)) != len(order):
            failures.append(fail("table_layout", f"{t.name}: rows are not grouped by level in the manifest's level "
                                                  f"order ({order[:8]})", t.name))
            continue
        for lv in levels:
            if lv not in order:
                failures.append(fail("table_layout", f"{t.name} has no rows at level {lv}", t.name, lv))
        runs[t.name] = dict(r)
    if not runs:
        return failures
    ref = next(t for t in tables if t.name in runs)  # the units of every level, as this table has them
    geoids = _first_geoids(root / "tables" / f"{ref.name}.parquet", list(runs[ref.name].items()), ref.n_lines, digits)
    geo = [LevelTables(lv, geoids[lv], {}) for lv in levels if lv in geoids]  # the units, no counts
    if digits.is_lookup:
        for lt in geo:
            assert digits.units is not None
            if not np.array_equal(lt.geoids, digits.units[lt.level][0]):
                failures.append(fail("geography", f"the {lt.level} units of the tables differ from those of "
                                                   f"{manifest['geography']['file']}", "*", lt.level))
    for lt in geo:
        want = next(g["units"] for g in manifest["geolevels"] if g["name"] == lt.level)
        if len(lt.geoids) != want:
            failures.append(fail("table_layout", f"{len(lt.geoids)} units published, manifest says {want}", "*", lt.level))
    whole = len(geo) == len(manifest["geolevels"])
    data, meas = part in ("all", "data"), part in ("all", "measurements")
    meas = meas and whole and bool(manifest["contents"]["measurements"])
    # the runs measured on a subset of the answers below the top (topdown), whose rows are
    # compared with the published parents' supports; a full measurement needs none
    subset: set[str] = set()
    if meas:
        from pipeline.release.measurements import subset_runs

        subset = subset_runs(root, ts.specs, geo)
    # the data half compares the block tables with the microdata; the measurement half needs only
    # which cells of the levels above are positive (both from one pass over the microdata)
    x_block, support, micro = (_microdata_counts(root, ts, geo, digits, int(manifest["persons"]), data,
                                                 "persons" in subset)
                               if geo and (data or "persons" in subset) else (None, {}, []))
    failures += micro
    inv = manifest["invariants"]
    block_geoids = block_hu = None
    if data and inv["block_housing_units"] is not None:  # (the table pass checks it: the data half)
        decl = inv["block_housing_units"]
        ipath = root / decl["file"]
        if root.resolve() in ipath.resolve().parents and ipath.is_file():
            block_geoids, block_hu = _invariant_blocks(ipath, geo[-1].geoids if geo else None)
            if len(block_geoids) != decl["blocks"] or int(block_hu.sum()) != decl["total"]:
                failures.append(fail("invariant", f"{decl['file']}: {len(block_geoids)} blocks with "
                                                   f"{int(block_hu.sum())} housing units, manifest says "
                                                   f"{decl['blocks']} blocks, {decl['total']} units", "H1"))
        else:
            failures.append(fail("file_missing", f"{decl['file']} (declared invariant) is missing"))
    # the design's margins, which the table rows and the unbiased rows are regenerated with:
    # recomputed once for both, kept in a scratch folder until both are checked
    margins = _Margins(manifest, ts, geo, digits) if data and regenerate and whole else None
    try:
        if data:
            failures += guard("tables", _stream_tables, root, manifest, ts,
                               [t for t in tables if t.name in runs], runs, geo, digits, x_block,
                               Invariants(inv["state_totals"], block_geoids, block_hu), margins)
        if x_block is not None:
            x_block.close()  # its scratch file
        if meas:
            failures += guard("measurements", _measurement_file_checks, root, manifest, ts, geo, digits, support,
                               subset)
        if whole and data and manifest["contents"].get("unbiased"):
            failures += guard("unbiased", _unbiased_checks, root, manifest, ts, geo, digits, margins)
    finally:
        if margins is not None:
            margins.close()
    return failures


def _invariant_blocks(path: Path, published: "np.ndarray | CodedGeoids | None") -> tuple[np.ndarray, np.ndarray]:
    """The blocks of the declared housing-unit invariant's file, sorted, and their housing units
    (int64). As a rule the file lists exactly the tables' blocks (``published``), in that order:
    then they are ``published`` itself — their int64 codes when ``published`` is
    :class:`CodedGeoids` — compared :data:`pipeline.release.tree.BLOCK_RANGE` rows at a time, so
    the check never holds a second copy of the country's block GEOIDs, nor the file's column
    whole. Otherwise the file's GEOIDs, sorted (strings)."""
    import pyarrow.parquet as pq

    if published is not None and pq.ParquetFile(path).metadata.num_rows == len(published):
        at, same, coded = 0, True, isinstance(published, CodedGeoids)
        for batch in parquet_stream(path).iter_batches(batch_size=geotree.BLOCK_RANGE, columns=["geoid"]):
            col = pl.Series(batch.column(0)).cast(pl.Utf8).to_numpy()
            if isinstance(published, CodedGeoids):
                codes, valid = parse_geoids(col, published.digits)
                same = bool(valid.all()) and np.array_equal(codes, published.codes[at:at + len(col)])
            else:
                same = np.array_equal(col.astype(str), published[at:at + len(col)])
            if not same:
                break
            at += len(col)
        if same:
            hu = pl.read_parquet(path, columns=["housing_units"])["housing_units"].to_numpy()
            return (published.codes if coded else published), hu
    idf = pl.read_parquet(path).sort("geoid")
    return idf["geoid"].to_numpy().astype(str), idf["housing_units"].to_numpy()


def _stream_tables(root: Path, manifest: Mapping[str, Any], ts: TableSet, tables: Sequence[Any],
                   runs: Mapping[str, Mapping[str, int]], geo: Sequence[LevelTables], tree: GeoTree,
                   x_block: Any, invariants: Invariants, margins: "_Margins | None") -> list[CheckFailure]:
    """One pass over every table file, level by level and :data:`pipeline.release.writer.STREAM_UNITS`
    units at a time: the layout of the rows (level, lines, labels, the same units in every table),
    the consistency checks and invariants (:class:`ReleaseChecks`), the block tables against the
    microdata (``x_block``: :class:`BlockCounts`), and with ``margins`` (the design's margins of
    error, :class:`_Margins`) every row regenerated from its counts and those margins, and every
    CSV row against its Parquet row. Memory: one chunk of every table plus the level above's
    counts."""
    from pipeline.release.checks import ReleaseChecks
    from pipeline.release.uncertainty import simulated_moe90
    from pipeline.release.writer import STREAM_UNITS

    out: list[CheckFailure] = []
    regenerate = margins is not None
    checks = ReleaseChecks(ts, tree, invariants)
    # without regenerating the rows, only the columns the layout and the checks read (the names,
    # the table column and moe90 are most of the decoding)
    columns = None if regenerate else ["geoid", "geolevel", "line", "label", "count"]
    # (and those strings as categories: the layout compares them, the check reads one GEOID a unit)
    streams = {t.name: RowStream(root / "tables" / f"{t.name}.parquet", columns, categorical=not regenerate)
               for t in tables}
    block = geo[-1].level if geo else ""
    # household population and the other check lines, per unit of every level, from the microdata
    check_lines: dict[str, dict[str, np.ndarray]] = {lt.level: {} for lt in geo}
    if x_block is not None and x_block.lines:
        # the blocks' own: the microdata's per-block sums themselves (not a copy: 8 bytes a block
        # and line, 45 MB a line on the US geography)
        check_lines[block] = dict(x_block.lines)
        blocks = geo[-1].geoids
        for lt in geo[:-1]:  # (each block's unit in the level found once for every line)
            pos, inside = tree.parent_positions(lt.level, lt.geoids, block, blocks)
            pos = pos[inside]
            # whole numbers below 2**53 in float64: exact
            check_lines[lt.level] = {name: np.bincount(pos, weights=per_block[inside], minlength=len(lt.geoids))
                                     .astype(np.int64) for name, per_block in x_block.lines.items()}
    moe = margins.get() if margins is not None else {}
    sim_file = (manifest.get("uncertainty") or {}).get("file")
    lookup = pl.read_parquet(root / sim_file) if regenerate and sim_file and (root / sim_file).is_file() else None
    against = "the rows regenerated from its counts and the design's margins of error"
    bad_rows: set[str] = set()   # files (Parquet or CSV) that already reported their first difference
    broken: set[str] = set()     # tables whose layout failed somewhere: no rows regenerated for them
    micro_reported: dict[str, int] = {}
    for i, lt in enumerate(geo):
        level, n = lt.level, len(lt.geoids)
        checks.begin_level(level, keep=i + 1 < len(geo))
        csvs: dict[str, Any] = {}
        for t in tables:
            crel = f"csv/{level}/{t.name}.csv"
            if regenerate and manifest["contents"]["csv"] and (root / crel).is_file():
                csv = _csv_chunks(root / crel)
                header = next(csv)
                if header != ",".join(CSV_SCHEMA):
                    out.append(fail("table_rows", f"{crel}: header {header!r}, expected {','.join(CSV_SCHEMA)!r}",
                                     t.name, level))
                else:
                    csvs[t.name] = csv
        skip: set[str] = set()  # tables whose rows at this level do not fit the layout
        for s in range(0, max(n, 1), STREAM_UNITS):
            e = min(s + STREAM_UNITS, n)
            g = lt.geoids[s:e]
            chunk = LevelTables(level, g, {}, {k: v[s:e] for k, v in check_lines[level].items()})
            found_rows: dict[str, pl.DataFrame] = {}
            for t in tables:
                rows = runs[t.name].get(level)
                if rows is None or t.name in skip:
                    continue
                sub = streams[t.name].take(min((e - s) * t.n_lines, rows - s * t.n_lines) if rows >= s * t.n_lines
                                           else 0)
                ok = (rows == n * t.n_lines and sub.height == (e - s) * t.n_lines
                      and bool((sub["geolevel"] == level).all())
                      and np.array_equal(sub["line"].to_numpy(), np.tile(np.asarray(t.numbers), e - s))
                      and _labelled(sub, t))
                if not ok:
                    out.append(fail("table_layout", f"{t.name} at {level}: rows are not every unit x lines "
                                     f"{t.numbers[0]}..{t.numbers[-1]} with the shell's labels", t.name, level))
                elif not regenerate and not np.array_equal(
                        sub["geoid"].gather_every(t.n_lines).cast(pl.Utf8).to_numpy().astype(str), g):
                    # (regenerating, the rows made from the counts and the units show where)
                    out.append(fail("table_layout", f"{t.name} at {level}: units differ from the other tables",
                                     t.name, level))
                    ok = False
                if not ok:
                    skip.add(t.name)
                    broken.add(t.name)
                    streams[t.name].take(max(rows - e * t.n_lines, 0))  # past the rest of the level
                    continue
                chunk.counts[t.name] = sub["count"].to_numpy().reshape(e - s, t.n_lines).astype(np.int64)
                found_rows[t.name] = sub
            checks.add(chunk)
            if level == block and x_block is not None:
                xs = x_block.rows(s, e)
                for t in ts.of_kind("persons"):
                    if t.name not in chunk.counts or micro_reported.get(t.name, 0) >= 20:
                        continue
                    got = tabulate(xs, t)
                    rr, cc = np.nonzero(got != chunk.counts[t.name])
                    for r, col in list(zip(rr, cc))[:20 - micro_reported.get(t.name, 0)]:
                        out.append(CheckFailure("microdata", t.name, int(t.numbers[col]), level, str(g[r]),
                                                int(got[r, col]), int(chunk.counts[t.name][r, col]),
                                                "microdata re-tabulated (expected) vs published block table (found)"))
                        micro_reported[t.name] = micro_reported.get(t.name, 0) + 1
            if not regenerate:
                continue
            names = tree.unit_names(level, g) if tree.is_lookup else unit_names(level, g)
            for t in tables:
                if t.name in broken or t.name not in found_rows:
                    continue
                rel, crel, found = f"tables/{t.name}.parquet", f"csv/{level}/{t.name}.csv", found_rows[t.name]
                m = moe.get((t.name, level))
                if lookup is not None:  # simulated margins: each is its group's value, or 0 (never moved)
                    m = simulated_moe90(lookup, None, t, level, chunk.counts[t.name])
                want = long_frame(t, level, g, names, chunk.counts[t.name],
                                  m if m is None or m.ndim == 1 or lookup is not None else m[s:e])
                if lookup is not None and "moe90" in found.columns:
                    want = want.with_columns(pl.when(found["moe90"] == 0).then(0.0).otherwise(pl.col("moe90"))
                                             .alias("moe90"))
                if rel not in bad_rows:
                    diff = _frame_diff(want, found, rel, against, t.name, level)
                    out += diff
                    if diff:
                        bad_rows.add(rel)
                if t.name in csvs and crel not in bad_rows:
                    diff = _frame_diff(csv_frame(found, tree.is_lookup), csvs[t.name].send(found.height), crel,
                                       f"{rel} (its {level} rows)", t.name, level)
                    out += diff
                    if diff:
                        bad_rows.add(crel)
        checks.end_level()
        for t in tables:
            crel = f"csv/{level}/{t.name}.csv"
            if t.name in csvs and crel not in bad_rows and t.name not in broken:
                rest = csvs[t.name].send(-1)
                if rest.height:
                    out.append(fail("table_rows", f"{crel}: {rest.height} row(s) beyond the {level} rows of "
                                                   f"tables/{t.name}.parquet", t.name, level))
            if t.name in csvs:
                csvs[t.name].close()
    return checks.failures() + out


def _labelled(rows: pl.DataFrame, t: Any) -> bool:
    """Whether the ``label`` of ``rows`` (a whole number of units, lines in the shell's order) is
    the shell's label of each line. A categorical column is compared by category codes (the
    shell's labels cast to the column's own categories), never as a string per row."""
    col, units = rows["label"], rows.height // t.n_lines
    if col.dtype == pl.Categorical:
        want = pl.Series(list(t.labels)).cast(col.dtype).to_physical().to_numpy()
        return bool(col.null_count() == 0 and np.array_equal(col.to_physical().to_numpy(), np.tile(want, units)))
    return bool(np.array_equal(col.to_numpy(), np.tile(np.asarray(t.labels, dtype=object), units)))


def _geography_checks(tree: GeoTree, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    """A lookup geography's published units: levels as the manifest's, unit counts as declared,
    codes unique per level, every parent a unit of the level above, parents in unit order."""
    if not tree.is_lookup:
        return []
    assert tree.units is not None
    rel = manifest["geography"]["file"]
    out = []
    for k, g in enumerate(manifest["geolevels"]):
        codes, parents = tree.units[g["name"]]
        if len(codes) != g["units"]:
            out.append(fail("geography", f"{rel}: {len(codes)} {g['name']} units, manifest says {g['units']}",
                             "*", g["name"]))
        if len(set(codes.tolist())) != len(codes):
            out.append(fail("geography", f"{rel}: a {g['name']} code appears twice", "*", g["name"]))
        if k == 0:
            if np.any(parents != ""):
                out.append(fail("geography", f"{rel}: a top-level unit has a parent", "*", g["name"]))
            continue
        pos = tree.position(manifest["geolevels"][k - 1]["name"], parents)
        if np.any(pos < 0):
            out.append(fail("geography", f"{rel}: {int((pos < 0).sum())} {g['name']} unit(s) whose parent is not a "
                                          f"{manifest['geolevels'][k - 1]['name']} unit", "*", g["name"]))
        elif pos.size > 1 and np.any(pos[1:] < pos[:-1]):
            out.append(fail("geography", f"{rel}: {g['name']} units are not grouped by parent in the order of "
                                          f"the level above", "*", g["name"]))
    return out


class _Margins:
    """The release's margins of error recomputed from its manifest (design, invariants, estimator)
    and, for the full estimator, the published geography's tree (``lts``: every level's units),
    when first asked for (:meth:`get`), as the writer made them: the full estimator's per-unit
    margins written to a scratch folder of their own (outside the release; removed by
    :meth:`close`) and read back a range of units at a time (:class:`DiskRows`), not held
    through the checks (~1.4 GB on the US geography)."""

    def __init__(self, manifest: Mapping[str, Any], ts: TableSet, lts: Sequence[LevelTables],
                 digits: "Mapping[str, int] | GeoTree") -> None:
        self.manifest, self.ts, self.lts, self.digits = manifest, ts, list(lts), digits
        self._moe: dict[tuple[str, str], Any] | None = None
        self._dir: Any = None

    def get(self) -> dict[tuple[str, str], Any]:
        """``{(table, level): moe90}`` as :func:`pipeline.release.manifest.release_margins` gives them."""
        if self._moe is None:
            import tempfile

            from pipeline.release.manifest import child_ptrs_from_tree, release_margins, variances_from_privacy

            manifest = self.manifest
            inv = manifest["invariants"]
            levels = [g["name"] for g in manifest["geolevels"]]
            estimator = (manifest.get("estimator") or {}).get("name", "topdown")
            # how the writer cut the tree to fit them; absent (releases before the cut): the whole tree
            part_units = int((manifest.get("estimator") or {}).get("margin_part_units", 0))
            geo = GeoTree.of(self.digits, levels)
            tree = child_ptrs_from_tree(geo, [lt.geoids for lt in self.lts]) if estimator == "full" else None
            if estimator == "full":
                self._dir = tempfile.TemporaryDirectory(prefix="dptab-verify-margins-")
            self._moe = release_margins(self.ts, variances_from_privacy(manifest["privacy"]), levels, geo.digits,
                                        inv["state_totals"] is not None, inv["block_housing_units"] is not None,
                                        estimator, tree, part_units,
                                        spill=Path(self._dir.name) if self._dir is not None else None)
        return self._moe

    def close(self) -> None:
        """Remove the scratch folder (the margins read from it no longer can be)."""
        self._moe = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _unbiased_checks(root: Path, manifest: Mapping[str, Any], ts: TableSet, lts: list[LevelTables],
                     digits: Mapping[str, int], margins: _Margins | None) -> list[CheckFailure]:
    """The unbiased tables; their rows regenerated (which needs the design's standard errors,
    ``margins``) only when given, as the count tables' rows."""
    from pipeline.release.unbiased import verify_unbiased

    return verify_unbiased(root, manifest, ts, lts, margins.get() if margins is not None else None, digits)


def _table_list_checks(ts: TableSet, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    """The manifest's tables are exactly the definitions' tables of the published runs, as defined."""
    runs = set(manifest["privacy"]["runs"])
    want = [t for t in ts.tables.values() if t.histogram in runs]
    listed = {t["name"]: t for t in manifest["tables"]}
    out = [fail("tables", f"table {t.name} ({t.histogram}) of {manifest['table_definitions']} is not published "
                           f"although the {t.histogram} run is", t.name) for t in want if t.name not in listed]
    for name, t in listed.items():
        d = ts.tables.get(name)
        if d is None or d.histogram not in runs:
            out.append(fail("tables", f"manifest lists table {name}, which {manifest['table_definitions']} does not "
                                       f"define for the published runs {sorted(runs)}", name))
            continue
        got = (t["title"], t["universe"], t["histogram"], t["lines"])
        if got != (d.title, d.universe, d.histogram, d.n_lines):
            out.append(fail("tables", f"manifest.json table {name}: (title, universe, histogram, lines) {got} differ "
                                       f"from the definitions' {(d.title, d.universe, d.histogram, d.n_lines)}", name))
    return out


def _csv_chunks(path: Path) -> Generator[Any, int, None]:
    """A generator that first yields the header line of a release CSV, then, sent a row count
    ``n``, the next ``n`` rows (``-1``: every remaining row) typed as :data:`CSV_SCHEMA`. Rows
    are split on line ends (no field of a release CSV holds a newline), so a block-level file is
    never read whole."""
    import io
    import itertools

    with open(path, newline="", encoding="utf-8") as fh:
        header = fh.readline()
        n = yield header.rstrip("\r\n")
        while True:
            lines = list(fh) if n < 0 else list(itertools.islice(fh, n))
            n = yield pl.read_csv(io.StringIO(header + "".join(lines)), schema=CSV_SCHEMA)


def _frame_diff(want: pl.DataFrame, found: pl.DataFrame, rel: str, against: str, table: str,
                level: str = "") -> list[CheckFailure]:
    """Failures where ``found`` (the file ``rel``) differs from ``want``: columns, rows, values."""
    if found.columns != want.columns or found.dtypes != want.dtypes:
        return [fail("table_rows", f"{rel}: columns {dict(found.schema)} differ from {against}: {dict(want.schema)}",
                      table, level)]
    if found.height != want.height:
        return [fail("table_rows", f"{rel}: {found.height} rows, {against} has {want.height}", table, level)]
    if found.equals(want):
        return []
    out = []
    for c in want.columns:
        a, b = want[c], found[c]
        bad = ~((a == b).fill_null(False) | (a.is_null() & b.is_null()))
        idx = np.flatnonzero(bad.to_numpy())
        if idx.size:
            r = int(idx[0])
            out.append(CheckFailure(
                "table_rows", table, int(want["line"][r]), str(want["geolevel"][r]),
                str(want["geoid"][r] if "geoid" in want.columns else want["GEO_ID"][r]),
                detail=f"{rel}: column {c} differs from {against} in {idx.size} row(s); first at row {r}: "
                       f"found {b[r]!r}, expected {a[r]!r}"))
    return out


def _measurement_file_checks(root: Path, manifest: Mapping[str, Any], ts: TableSet, lts: list[LevelTables],
                             digits: Mapping[str, int], support: Mapping[str, Any], subset: set[str]
                             ) -> list[CheckFailure]:
    """The published noisy measurements against the design and the published geography
    (``support``: the persons levels above the blocks, :func:`_microdata_counts`; ``subset``:
    the runs measured on a subset of the answers, :func:`subset_runs`, the only ones whose
    published supports are made)."""
    from pipeline.release.measurements import FILES, measurement_checks

    if not manifest["contents"]["measurements"] or not all((root / rel).is_file() for rel in FILES):
        return []  # a missing file is reported as such (required_files)
    from pipeline.model.design import design_from_rho

    runs = manifest["privacy"]["runs"]
    design = design_from_rho({kind: run["rho_by_level_query"] for kind, run in runs.items()})
    published = _published_supports(root, ts, lts, [k for k in runs if k in subset], support)
    return measurement_checks(root, design, ts.specs, lts, digits, published)


def _published_supports(root: Path, ts: TableSet, lts: list[LevelTables], kinds: Sequence[str],
                        persons: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{kind: {level: csr (n_units, n_cells)}}`` for every level but the bottom one, positive
    exactly where the level's published histogram is (what the measurement checks read of it).

    Persons: ``persons`` (the microdata's supports, :func:`_microdata_counts`; empty when the
    microdata are unreadable: then left out). Units: the histogram solved from the tables of the
    units histogram (read from ``tables/``) when their lines determine every cell (H1: occupied,
    vacant); a kind whose histogram the release does not determine, or one of whose tables does
    not have the layout (reported by the table checks), is left out.
    """
    import scipy.sparse as sp

    out: dict[str, dict[str, Any]] = {}
    if "persons" in kinds and persons:
        out["persons"] = dict(persons)
    upper = lts[:-1]
    for kind in kinds:
        if kind == "persons":
            continue
        spec, tabs = ts.specs[kind], ts.of_kind(kind)
        m = sp.vstack([t.matrix for t in tabs]).toarray().astype(np.float64) if tabs else None  # (lines, cells)
        if m is None or np.linalg.matrix_rank(m) < spec.n_cells:
            continue
        counts = [_upper_counts(root, t, upper) for t in tabs]
        if any(c is None for c in counts):
            continue
        pinv = np.linalg.pinv(m)                                             # (cells, lines)
        hist = {}
        for i, lt in enumerate(upper):
            c = np.hstack([tc[i] for tc in counts if tc is not None]).astype(np.float64)  # (units, lines)
            hist[lt.level] = sp.csr_matrix(np.rint(c @ pinv.T).astype(np.int64))
        out[kind] = hist
    return out


def _upper_counts(root: Path, t: Any, upper: Sequence[LevelTables]) -> list[np.ndarray] | None:
    """The counts of table ``t`` at the levels ``upper`` (the first levels of the file, in its
    order), int64 ``(n_units, n_lines)`` each; ``None`` when its rows there are not every unit x
    the shell's lines (the table checks report how)."""
    stream = RowStream(root / "tables" / f"{t.name}.parquet", ["geolevel", "line", "count"], categorical=True)
    out = []
    for lt in upper:
        n = len(lt.geoids)
        rows = stream.take(n * t.n_lines)
        if (rows.height != n * t.n_lines or not bool((rows["geolevel"].cast(pl.Utf8) == lt.level).all())
                or not np.array_equal(rows["line"].to_numpy(), np.tile(np.asarray(t.numbers), n))):
            return None
        out.append(rows["count"].to_numpy().reshape(n, t.n_lines).astype(np.int64))
    return out


def _aggregate(x: Any, block: LevelTables, lt: LevelTables, tree: GeoTree) -> Any:
    """Sum the rows of csr ``x`` (the units of ``block``) into the units of ``lt``, a level above
    (their ancestors there)."""
    import scipy.sparse as sp

    pos, found = tree.parent_positions(lt.level, lt.geoids, block.level, block.geoids)
    ok = np.nonzero(found)[0]  # orphans: hierarchy
    agg = sp.csr_matrix((np.ones(ok.size, np.int64), (pos[ok], ok)), shape=(len(lt.geoids), len(block.geoids)))
    return (agg @ x).tocsr()
