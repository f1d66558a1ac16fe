"""``dptab verify RELEASE_DIR``: recompute every checksum and every consistency check of a release.

Works from the files alone (no run directory, no geography object): the manifest gives the
levels and their GEOID lengths, the tables are re-read from Parquet and pivoted back to
``(n_units, n_lines)`` arrays, the household population comes from the protected microdata,
and the microdata are re-tabulated to the block tables they must reproduce.

Nothing in the manifest is taken on trust that can be recomputed from the release:

- the privacy section (ρ per level × query, ρ and ε per run and composed, at the manifest's δ)
  is recomputed from the strategy copies ``privacy/<kind>.yaml`` the release carries, so it
  stays verifiable when the package's strategies change;
- the release id must be the folder's name, a seed is present iff ``randomness`` is
  ``seeded``, and ``index.html`` must be the page the manifest renders to (it shows the seed,
  ρ, ε and every checksum, so an edit of one that is not carried into the other shows);
- the files must be exactly those the manifest's own settings require (:func:`required_files`);
- every table's rows are regenerated from its counts with the writer's own code (names,
  labels, and ``moe90`` from the measurement design: bitwise equal), and every CSV is compared
  with its Parquet table;
- the noisy measurements are checked against the design (variance, σ², which level × query,
  answer labels) and the published geography (units, answers, which answers a run draws:
  :func:`pipeline.release.measurements.measurement_checks`), vectorised over rows.

What the release cannot show: a noisy measurement's *value* edited together with its checksum
(nothing public determines it), or a consistent rewrite of every file and the manifest. The
verdict is that of the verifier's own code: a release written by another version with a
different page or table layout is reported as differing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from pipeline.errors import DptabError, InputError
from pipeline.model.geonames import unit_names
from pipeline.release.checks import MAX_PER_GROUP, CheckFailure, Invariants
from pipeline.release.microdata import MicrodataError, histogram_from_microdata
from pipeline.release.tables import (
    CSV_SCHEMA,
    LevelTables,
    RowStream,
    TableSet,
    csv_frame,
    level_runs,
    load_tables,
    long_frame,
    tabulate,
    tabulate_vector,
)
from pipeline.release.tree import GeoTree, read_tree


class ReleaseFormatError(InputError):
    """The directory is not a release (no readable manifest.json): CLI exit status 2."""


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every violation of ``schemas/manifest.schema.json``."""
    errors = manifest_errors(manifest)
    if errors:
        raise ValueError("manifest does not match schemas/manifest.schema.json:\n  " + "\n  ".join(errors))


def manifest_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Every schema violation of a manifest, as readable strings (empty when valid)."""
    import jsonschema

    from pipeline.release.manifest import MANIFEST_SCHEMA

    schema = json.loads(MANIFEST_SCHEMA.read_text())
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(v.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def _fail(check: str, detail: str, table: str = "*", geolevel: str = "", geoid: str = "") -> CheckFailure:
    return CheckFailure(check, table, None, geolevel, geoid, detail=detail)


def _verify_files(root: Path, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    from pipeline.files import sha256_file

    out: list[CheckFailure] = []
    listed = set()
    for f in manifest.get("files", []):
        rel = f.get("path", "")
        listed.add(rel)
        p = root / rel
        if root.resolve() not in (p.resolve().parents):  # e.g. "../x": the manifest points outside
            out.append(_fail("manifest", f"{rel} is not inside the release folder"))
            continue
        if not p.is_file():
            out.append(_fail("file_missing", f"{rel} is listed in the manifest but missing"))
            continue
        digest = sha256_file(p)
        if digest != f.get("sha256") or p.stat().st_size != f.get("bytes"):
            out.append(_fail("checksum", f"{rel}: sha256 {digest} ({p.stat().st_size} bytes) differs from the "
                                         f"manifest's {f.get('sha256')} ({f.get('bytes')} bytes)"))
        elif p.suffix == ".parquet" and "rows" in f:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(p).metadata.num_rows
            except (OSError, pa.ArrowException) as exc:
                out.append(_fail("unreadable", f"{rel}: not a readable Parquet file ({exc})"))
                continue
            if rows != f["rows"]:
                out.append(_fail("rows", f"{rel}: {rows} rows, manifest says {f['rows']}"))
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "manifest.json" and rel not in listed:
            out.append(_fail("file_unlisted", f"{rel} is in the release but not in the manifest"))
    return out


def _first_geoids(path: Path, runs: Sequence[tuple[str, int]], n_lines: int) -> dict[str, np.ndarray]:
    """The GEOID of the first row of every unit (every ``n_lines``-th row of each level's run),
    per level: the units a table publishes, in file order, read a batch of rows at a time."""
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {lv: [] for lv, _ in runs}
    bounds = np.cumsum([0] + [n for _, n in runs])
    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=["geoid"]):
        g = pl.Series(batch.column(0))
        for k, (lv, _) in enumerate(runs):
            lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + len(g))
            if lo >= hi:
                continue
            first = lo + (-(lo - bounds[k])) % n_lines  # the next row that starts a unit
            if first < hi:
                parts[lv].append(g.slice(first - offset, hi - first).gather_every(n_lines).to_numpy().astype(str))
        offset += len(g)
    return {lv: np.concatenate(p) if p else np.zeros(0, dtype=str) for lv, p in parts.items()}


def _microdata_histogram(root: Path, ts: TableSet, block: LevelTables,
                         manifest_persons: int) -> tuple[Any, list[CheckFailure]]:
    """The block histogram the microdata re-tabulate to, csr int64 ``(n_blocks, n_cells)``, read
    a row group of persons at a time; ``None`` and the failures when the file is missing,
    unreadable, of another size than the manifest says, or holds persons of unpublished blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    path = root / "microdata" / "persons.parquet"
    if not path.is_file():
        return None, [_fail("file_missing", "microdata/persons.parquet (every release carries its microdata)")]
    spec = ts.specs["persons"]
    g = np.asarray(block.geoids).astype(str)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    try:
        f = pq.ParquetFile(path)
        if f.metadata.num_rows != manifest_persons:
            return None, [_fail("microdata", f"{f.metadata.num_rows} microdata rows, manifest says "
                                             f"{manifest_persons} persons")]
        # only the columns the re-tabulation reads (EPNUM, RTYPE and TABBLKGRPCE are most of the decoding)
        names = f.schema_arrow.names
        wanted = (["geoid", *(a.name for a in spec.attributes)] if "geoid" in names else
                  ["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK", "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE"])
        for batch in f.iter_batches(batch_size=1 << 20, columns=[c for c in wanted if c in names]):
            persons = pl.from_arrow(batch)
            assert isinstance(persons, pl.DataFrame)
            lo, hi = 0, len(g)
            if "geoid" not in persons.columns and persons.height:
                # PPMF rows sort by block: look their blocks up among the published blocks between
                # the batch's first and last GEOID only (never a copy of every block per batch)
                keys = persons.select(pl.concat_str(["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK"])
                                      .alias("k")).select(pl.col("k").min().alias("a"), pl.col("k").max().alias("b"))
                lo = int(np.searchsorted(g, str(keys["a"][0]), side="left"))
                hi = int(np.searchsorted(g, str(keys["b"][0]), side="right"))
            unit, cell, count = histogram_from_microdata(persons, g[lo:hi], spec)
            parts.append((unit + lo, cell, count))
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
        return None, [_fail("unreadable", f"microdata/persons.parquet: {exc}")]
    except (MicrodataError, ValueError) as exc:
        return None, [_fail("microdata", str(exc))]
    cat = [np.concatenate([q[i] for q in parts]) if parts else np.zeros(0, np.int64) for i in range(3)]
    # a block split between two batches appears twice: the csr constructor adds its entries up
    return sp.csr_matrix((cat[2], (cat[0], cat[1])), shape=(len(g), spec.n_cells), dtype=np.int64), []


def verify_release(path: str | Path, *, release_id: str | None = None, regenerate: bool = True,
                   contents: bool = True) -> list[CheckFailure]:
    """Every failure of a release folder (empty list: all checksums and checks pass).

    ``release_id``: the id the release must carry (default: the folder's name; the writer
    passes its id while the folder still has its temporary name). Raises
    :class:`ReleaseFormatError` if ``path`` has no readable ``manifest.json``.

    Checked, each independently (a damaged file cannot hide another failure): the manifest's
    schema; its id against the folder name; seed iff seeded randomness; ``index.html`` equal to
    the page the manifest renders to; every listed file's sha256, size and rows; the files
    present and listed against what the manifest's own settings require; the privacy section
    recomputed from the strategy copies in ``privacy/``; every table's rows regenerated from its
    counts (names, labels, and every ``moe90`` recomputed from the design, bitwise); each CSV
    against its Parquet table; the consistency checks and declared invariants; the microdata
    against the block tables; the noisy measurements against the design and the geography; the
    area explorer's files against the ones the tables make.

    ``regenerate=False`` (the writer's self-check of the folder it has just written from the same
    frames) skips what would only re-run the writer's own code: the table rows and CSVs
    regenerated from the counts and the explorer files regenerated from the tables.

    ``contents=False`` leaves out everything read from the data files (tables, microdata,
    invariants, measurements, unbiased estimates): the writer runs :func:`verify_contents` on
    them in a process of its own while it writes the explorer.
    """
    root = Path(path)
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ReleaseFormatError(f"{root}: not a release (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise ReleaseFormatError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ReleaseFormatError(f"{mpath}: not a JSON object")
    failures = [_fail("manifest", e) for e in manifest_errors(manifest)]
    if failures:
        return failures
    expect = release_id if release_id is not None else root.resolve().name
    recomputed: list[dict[str, Any]] = []
    failures += _guard("privacy", _verify_privacy, root, manifest, recomputed)
    failures += _guard("identity", _verify_identity, root, manifest, expect, recomputed[0] if recomputed else None)
    failures += _verify_files(root, manifest)
    failures += _guard("contents", _verify_required_files, manifest, root, regenerate)
    if contents:
        failures += verify_contents(root, manifest, regenerate)
    failures += _guard("joint", _verify_joint, root, manifest)
    if regenerate:
        failures += _guard("explorer", _verify_explorer, root, manifest)
    return failures


def verify_contents(root: Path, manifest: Mapping[str, Any], regenerate: bool = True) -> list[CheckFailure]:
    """The checks of :func:`verify_release` that read the data files of the release folder
    ``root`` (the tables against their layout, the hierarchy and the invariants; the microdata
    against the block tables; the noisy measurements and unbiased estimates against the design
    and the geography), with ``manifest`` as parsed (a schema-valid manifest dict). Reads only
    the manifest's ``table_definitions``, ``tables``, ``geolevels``, ``geography``,
    ``persons``, ``invariants``, ``contents``, ``privacy``, ``estimator`` and ``uncertainty``:
    not the file list, the codebook or the explorer, so it can run before those are written."""
    return _guard("unreadable", _verify_contents, root, manifest, regenerate)


def _verify_joint(root: Path, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    """With ``joint.households`` no unit may break the persons-vs-units rules
    (``pipeline.release.joint``), unless the manifest says the engine relaxed a bound; without
    it (2020 TopDown) they are only counted."""
    joint = manifest.get("joint") or {}
    if not joint.get("households") or joint.get("relaxed"):
        # off (2020), or the engine relaxed a bound somewhere (counted in its diagnostics):
        # the rules are then only counted (`dptab verify` prints the counts)
        return []
    from pipeline.release.joint import RULES, release_joint_violations

    v = release_joint_violations(root)
    if v is None:
        return []  # not the PL94 tables (a missing table file is reported as such)
    return [_fail("joint", f"{int(row[rule])} unit(s) break the rule {rule} although the release holds persons "
                           "to its housing units (joint.households)", "P1", row["geolevel"])
            for row in v.iter_rows(named=True) for rule in RULES if row[rule]]


#: (loader, sha256 of the file) -> what it loaded: a verifier process (the writer's self-check,
#: a test suite) reads the same definitions and strategies again and again
_LOADED: dict[tuple[str, str], Any] = {}


def _by_content(loader: Callable[[Path], Any], path: Path) -> Any:
    """``loader(path)``, memoised on the file's bytes (the package's specs and geolevels, which
    loaders also read, do not change within a process)."""
    from pipeline.files import sha256_file

    key = (f"{loader.__module__}.{loader.__qualname__}", sha256_file(path))
    if key not in _LOADED:
        if len(_LOADED) > 64:
            _LOADED.clear()
        _LOADED[key] = loader(path)
    return _LOADED[key]


def _guard(check: str, fn: Callable[..., list[CheckFailure]], *args: Any) -> list[CheckFailure]:
    """``fn(*args)``, with a damaged or malformed file reported as one failure instead of raised."""
    try:
        return fn(*args)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ArithmeticError, pl.exceptions.PolarsError,
            DptabError) as exc:
        # a damaged file (usually already reported by its checksum) must not hide other failures
        return [_fail(check, f"{fn.__name__.lstrip('_')} stopped: {type(exc).__name__}: {exc}")]


def _verify_identity(root: Path, manifest: Mapping[str, Any], expect: str,
                     privacy: Mapping[str, Any] | None) -> list[CheckFailure]:
    """Release id = folder name; a seed iff randomness is seeded; index.html = the manifest's page.

    ``privacy``: the recomputed privacy section (its key order is the writer's; manifest.json is
    stored with sorted keys), used for the page when it equals the manifest's.
    """
    out = []
    if manifest["release_id"] != expect:
        out.append(_fail("identity", f"manifest.json: release_id {manifest['release_id']!r} differs from the "
                                     f"release folder's name {expect!r}"))
    seeded, seed = manifest["randomness"] == "seeded", manifest["seed"]
    if seeded != (seed is not None):
        out.append(_fail("identity", f"manifest.json: randomness {manifest['randomness']!r} with seed {seed!r}; "
                                     "a seed is recorded iff the randomness is seeded"))
    index = root / "index.html"
    if index.is_file():
        from pipeline.release.html import render_index

        m = dict(manifest)  # the page is rendered before its own entry joins the file list
        m["files"] = [f for f in manifest["files"] if f["path"] != "index.html"]
        if privacy is not None and privacy == manifest["privacy"]:
            m["privacy"] = privacy
        if index.read_text(encoding="utf-8") != render_index(m):
            out.append(_fail("identity", "index.html differs from the page manifest.json renders to (the manifest "
                                         "or the page was edited after the release was written)"))
    return out


def required_files(manifest: Mapping[str, Any], spec_files: Iterable[str] = ()) -> set[str]:
    """Relative paths a release must hold by its manifest's own settings (besides manifest.json).

    Every published table as Parquet (and per geolevel as CSV when ``contents.csv``), the table
    definitions and the specs they name (``spec_files``), the codebook (``README.md``,
    ``codebook.json``), the microdata, each run's strategy copy, the block housing-unit file when
    that invariant is declared, the noisy measurements when ``contents.measurements``, and
    index.html.
    """
    need = {"index.html", manifest["table_definitions"], "microdata/persons.parquet", "README.md", "codebook.json",
            *spec_files}
    for t in manifest["tables"]:
        need.add(f"tables/{t['name']}.parquet")
        if manifest["contents"]["csv"]:
            need |= {f"csv/{g['name']}/{t['name']}.csv" for g in manifest["geolevels"]}
    if manifest["contents"]["measurements"]:
        from pipeline.release.measurements import FILES

        need |= set(FILES)
    if manifest["contents"].get("unbiased"):
        need |= {f"tables/unbiased/{t['name']}.parquet" for t in manifest["tables"]}
    bhu = manifest["invariants"]["block_housing_units"]
    if bhu is not None:
        need.add(bhu["file"])
    if (manifest.get("uncertainty") or {}).get("file"):
        need.add(manifest["uncertainty"]["file"])
    if manifest.get("geography"):
        need.add(manifest["geography"]["file"])
    need |= {run["strategy_file"] for run in manifest["privacy"]["runs"].values()}
    from pipeline.release.manifest import strategy_spec_files

    need |= set(strategy_spec_files(manifest["privacy"]))
    return need


def _spec_copies(root: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The spec copies the release's table definitions name (``persons_spec``, ``units_spec``),
    as release paths beside the definitions."""
    import yaml

    defs = Path(manifest["table_definitions"])
    raw = yaml.safe_load((root / defs).read_text())
    out = []
    for kind in ("persons", "units"):
        ref = str(raw[f"{kind}_spec"])
        out.append((defs.parent / (Path(ref).name if Path(ref).suffix else f"{ref}.yaml")).as_posix())
    return out


def explorer_files(root: Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{release path: sha256}`` of the area explorer's files as the writer makes them from
    this release's own tables (regenerated in a scratch folder)."""
    import hashlib
    import tempfile

    from pipeline.release.html import write_explorer

    with tempfile.TemporaryDirectory(prefix="dptab-verify-") as tmp:
        scratch = Path(tmp)
        (scratch / "tables").symlink_to((root / "tables").resolve())
        geo = (manifest.get("geography") or {}).get("file")
        if geo and (root / geo).is_file():  # a lookup geography: the explorer nests areas by it
            (scratch / geo).symlink_to((root / geo).resolve())
        return {p.relative_to(scratch).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in write_explorer(scratch, manifest)}


def _verify_explorer(root: Path, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    """The explorer's files are exactly those the writer makes from the published tables."""
    from pipeline.files import sha256_file

    out = []
    for rel, want in sorted(explorer_files(root, manifest).items()):
        path = root / rel
        if path.is_file() and sha256_file(path) != want:
            out.append(_fail("explorer", f"{rel} differs from the explorer data made from the release's tables"))
    return out


def _verify_required_files(manifest: Mapping[str, Any], root: Path, regenerate: bool = True) -> list[CheckFailure]:
    listed = {f["path"] for f in manifest["files"]}
    # the explorer's files are those the tables make (regenerated), or, in the writer's
    # self-check, the ones it has just listed
    explorer = (set(explorer_files(root, manifest)) if regenerate
                else {p for p in listed if p.startswith("explorer/")})
    need = required_files(manifest, _spec_copies(root, manifest)) | explorer
    s = manifest["contents"]
    why = f"csv {s['csv']}, measurements {s['measurements']}, tables {[t['name'] for t in manifest['tables']]}"
    out = [_fail("file_missing", f"{p} is required by the manifest's settings ({why}) but not listed in its files")
           for p in sorted(need - listed)]
    out += [_fail("file_unexpected", f"{p} is listed in the manifest but is not part of a release with these "
                                     f"settings ({why})") for p in sorted(listed - need)]
    seen: set[str] = set()
    for f in manifest["files"]:
        if f["path"] in seen:
            out.append(_fail("manifest", f"{f['path']} is listed twice in the manifest's files"))
        seen.add(f["path"])
    return out


def _verify_privacy(root: Path, manifest: Mapping[str, Any], recomputed: list[dict[str, Any]]) -> list[CheckFailure]:
    """Recompute the whole privacy section from the strategy copies the manifest names (appended
    to ``recomputed``) and report every value of the manifest's that differs."""
    from pipeline.model.strategy import StrategyError, load_strategy
    from pipeline.release.manifest import privacy_parameters

    privacy = manifest["privacy"]
    loaded, out = {}, []
    for kind, run in privacy["runs"].items():
        rel = run["strategy_file"]
        p = root / rel
        if root.resolve() not in p.resolve().parents or not p.is_file():
            out.append(_fail("privacy", f"{rel} (the {kind} run's strategy) is missing: the privacy section "
                                        "cannot be recomputed"))
            continue
        try:
            loaded[kind] = _by_content(load_strategy, p)
        except StrategyError as exc:
            out.append(_fail("privacy", f"{rel}: {exc}"))
    if out:
        return out
    got = dict(privacy_parameters(loaded, privacy["delta"]))
    recomputed.append(got)
    diffs = _json_diff(got, privacy, "privacy")
    files = ", ".join(run["strategy_file"] for run in privacy["runs"].values())
    return [_fail("privacy", f"manifest.json {d} (recomputed from {files} at delta {privacy['delta']})")
            for d in diffs[:MAX_PER_GROUP]]


def _json_diff(want: Any, found: Any, where: str) -> list[str]:
    """Readable differences between two JSON values: ``where: found X, expected Y``."""
    if isinstance(want, dict) and isinstance(found, dict):
        out = []
        for k in want:
            if k not in found:
                out.append(f"{where}.{k}: missing, expected {want[k]!r}")
            else:
                out += _json_diff(want[k], found[k], f"{where}.{k}")
        out += [f"{where}.{k}: unexpected {found[k]!r}" for k in found if k not in want]
        return out
    if want != found or type(want) is not type(found):
        return [f"{where}: found {found!r}, expected {want!r}"]
    return []


def _verify_contents(root: Path, manifest: Mapping[str, Any], regenerate: bool = True) -> list[CheckFailure]:
    failures: list[CheckFailure] = []
    defs = root / manifest["table_definitions"]
    if root.resolve() not in defs.resolve().parents or not defs.is_file():
        return [_fail("file_missing", f"table definitions {manifest['table_definitions']} not found in the release")]
    ts = _by_content(load_tables, defs.resolve())
    failures += _table_list_checks(ts, manifest)
    try:
        digits = read_tree(root, manifest)
    except (OSError, pl.exceptions.PolarsError, KeyError) as exc:
        return failures + [_fail("geography", f"{(manifest.get('geography') or {}).get('file')}: cannot read the "
                                              f"published geography ({exc})")]
    failures += _geography_checks(digits, manifest)
    tables = [t for t in ts.tables.values() if t.name in {m["name"] for m in manifest["tables"]}]
    levels = [g["name"] for g in manifest["geolevels"]]
    runs: dict[str, dict[str, int]] = {}
    for t in tables:
        path = root / "tables" / f"{t.name}.parquet"
        if not path.is_file():
            failures.append(_fail("file_missing", f"tables/{t.name}.parquet (listed in the manifest's tables)", t.name))
            continue
        r = level_runs(path)
        order = [lv for lv, _ in r]
        if order != [lv for lv in levels if lv in order] or len(set(order)) != len(order):
            failures.append(_fail("table_layout", f"{t.name}: rows are not grouped by level in the manifest's level "
                                                  f"order ({order[:8]})", t.name))
            continue
        for lv in levels:
            if lv not in order:
                failures.append(_fail("table_layout", f"{t.name} has no rows at level {lv}", t.name, lv))
        runs[t.name] = dict(r)
    if not runs:
        return failures
    ref = next(t for t in tables if t.name in runs)  # the units of every level, as this table has them
    geoids = _first_geoids(root / "tables" / f"{ref.name}.parquet", list(runs[ref.name].items()), ref.n_lines)
    geo = [LevelTables(lv, geoids[lv], {}) for lv in levels if lv in geoids]  # the units, no counts
    if digits.is_lookup:
        for lt in geo:
            assert digits.units is not None
            if not np.array_equal(lt.geoids, digits.units[lt.level][0]):
                failures.append(_fail("geography", f"the {lt.level} units of the tables differ from those of "
                                                   f"{manifest['geography']['file']}", "*", lt.level))
    for lt in geo:
        want = next(g["units"] for g in manifest["geolevels"] if g["name"] == lt.level)
        if len(lt.geoids) != want:
            failures.append(_fail("table_layout", f"{len(lt.geoids)} units published, manifest says {want}", "*", lt.level))
    x_block, micro = _microdata_histogram(root, ts, geo[-1], int(manifest["persons"])) if geo else (None, [])
    failures += micro
    inv = manifest["invariants"]
    block_geoids = block_hu = None
    if inv["block_housing_units"] is not None:
        decl = inv["block_housing_units"]
        ipath = root / decl["file"]
        if root.resolve() in ipath.resolve().parents and ipath.is_file():
            idf = pl.read_parquet(ipath).sort("geoid")
            block_geoids, block_hu = idf["geoid"].to_numpy().astype(str), idf["housing_units"].to_numpy()
            if idf.height != decl["blocks"] or int(block_hu.sum()) != decl["total"]:
                failures.append(_fail("invariant", f"{decl['file']}: {idf.height} blocks with {int(block_hu.sum())} "
                                                   f"housing units, manifest says {decl['blocks']} blocks, "
                                                   f"{decl['total']} units", "H1"))
        else:
            failures.append(_fail("file_missing", f"{decl['file']} (declared invariant) is missing"))
    whole = len(geo) == len(manifest["geolevels"])
    failures += _guard("tables", _stream_tables, root, manifest, ts,
                       [t for t in tables if t.name in runs], runs, geo, digits, x_block,
                       Invariants(inv["state_totals"], block_geoids, block_hu), regenerate and whole)
    if whole:
        failures += _guard("measurements", _measurement_file_checks, root, manifest, ts, geo, digits, x_block)
        if manifest["contents"].get("unbiased"):
            failures += _guard("unbiased", _unbiased_checks, root, manifest, ts, geo, digits)
    return failures


def _stream_tables(root: Path, manifest: Mapping[str, Any], ts: TableSet, tables: Sequence[Any],
                   runs: Mapping[str, Mapping[str, int]], geo: Sequence[LevelTables], tree: GeoTree,
                   x_block: Any, invariants: Invariants, regenerate: bool) -> list[CheckFailure]:
    """One pass over every table file, level by level and :data:`pipeline.release.writer.STREAM_UNITS`
    units at a time: the layout of the rows (level, lines, labels, the same units in every table),
    the consistency checks and invariants (:class:`ReleaseChecks`), the block tables against the
    microdata (``x_block``: csr ``(n_blocks, n_cells)``), and with ``regenerate`` every row
    regenerated from its counts and the design's margins of error, and every CSV row against its
    Parquet row. Memory: one chunk of every table plus the level above's counts. The counts of
    the tables of histograms other than persons are left in ``geo`` (``counts``)."""
    from pipeline.release.checks import ReleaseChecks
    from pipeline.release.uncertainty import simulated_moe90
    from pipeline.release.writer import STREAM_UNITS

    out: list[CheckFailure] = []
    checks = ReleaseChecks(ts, tree, invariants)
    # without regenerating the rows, only the columns the layout and the checks read (the names,
    # the table column and moe90 are most of the decoding)
    columns = None if regenerate else ["geoid", "geolevel", "line", "label", "count"]
    streams = {t.name: RowStream(root / "tables" / f"{t.name}.parquet", columns) for t in tables}
    block = geo[-1].level if geo else ""
    # household population and the other check lines, per unit of every level, from the microdata
    check_lines: dict[str, dict[str, np.ndarray]] = {lt.level: {} for lt in geo}
    if x_block is not None:
        for c in ts.check_lines.values():
            if c.histogram != "persons":
                continue
            per_block = tabulate_vector(x_block, c.vector)
            for lt in geo:
                pos, inside = tree.parent_positions(lt.level, lt.geoids, block, geo[-1].geoids)
                check_lines[lt.level][c.name] = np.bincount(pos[inside], weights=per_block[inside],
                                                            minlength=len(lt.geoids)).astype(np.int64)
    moe = _margins(manifest, ts, list(geo), tree) if regenerate else {}
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
                    out.append(_fail("table_rows", f"{crel}: header {header!r}, expected {','.join(CSV_SCHEMA)!r}",
                                     t.name, level))
                else:
                    csvs[t.name] = csv
        skip: set[str] = set()  # tables whose rows at this level do not fit the layout
        # the other histograms' tables (units: H1, 3 lines) are kept whole: the measurement checks
        # solve every level's units histogram from them
        kept: dict[str, list[np.ndarray]] = {}
        names = tree.unit_names(level, lt.geoids) if tree.is_lookup else unit_names(level, lt.geoids)
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
                label_of = dict(zip(t.numbers, t.labels))
                ok = (rows == n * t.n_lines and sub.height == (e - s) * t.n_lines
                      and bool((sub["geolevel"] == level).all())
                      and np.array_equal(sub["line"].to_numpy(), np.tile(np.asarray(t.numbers), e - s))
                      and not sub.select((pl.col("label") != pl.col("line").replace_strict(
                          label_of, default=None, return_dtype=pl.Utf8)).fill_null(True).any()).item())
                if not ok:
                    out.append(_fail("table_layout", f"{t.name} at {level}: rows are not every unit x lines "
                                     f"{t.numbers[0]}..{t.numbers[-1]} with the shell's labels", t.name, level))
                elif not regenerate and not np.array_equal(sub["geoid"].gather_every(t.n_lines).to_numpy().astype(str), g):
                    # (regenerating, the rows made from the counts and the units show where)
                    out.append(_fail("table_layout", f"{t.name} at {level}: units differ from the other tables",
                                     t.name, level))
                    ok = False
                if not ok:
                    skip.add(t.name)
                    broken.add(t.name)
                    streams[t.name].take(max(rows - e * t.n_lines, 0))  # past the rest of the level
                    continue
                chunk.counts[t.name] = sub["count"].to_numpy().reshape(e - s, t.n_lines).astype(np.int64)
                found_rows[t.name] = sub
                if t.histogram != "persons":
                    kept.setdefault(t.name, []).append(chunk.counts[t.name])
            checks.add(chunk)
            if level == block and x_block is not None:
                xs = x_block[s:e]
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
            for t in tables:
                if t.name in broken or t.name not in found_rows:
                    continue
                rel, crel, found = f"tables/{t.name}.parquet", f"csv/{level}/{t.name}.csv", found_rows[t.name]
                m = moe.get((t.name, level))
                if lookup is not None:  # simulated margins: each is its group's value, or 0 (never moved)
                    m = simulated_moe90(lookup, None, t, level, chunk.counts[t.name])
                want = long_frame(t, level, g, names[s:e], chunk.counts[t.name],
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
        lt.counts.update({name: np.concatenate(parts) for name, parts in kept.items() if name not in skip})
        for t in tables:
            crel = f"csv/{level}/{t.name}.csv"
            if t.name in csvs and crel not in bad_rows and t.name not in broken:
                rest = csvs[t.name].send(-1)
                if rest.height:
                    out.append(_fail("table_rows", f"{crel}: {rest.height} row(s) beyond the {level} rows of "
                                                   f"tables/{t.name}.parquet", t.name, level))
            if t.name in csvs:
                csvs[t.name].close()
    return checks.failures() + out


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
            out.append(_fail("geography", f"{rel}: {len(codes)} {g['name']} units, manifest says {g['units']}",
                             "*", g["name"]))
        if len(set(codes.tolist())) != len(codes):
            out.append(_fail("geography", f"{rel}: a {g['name']} code appears twice", "*", g["name"]))
        if k == 0:
            if np.any(parents != ""):
                out.append(_fail("geography", f"{rel}: a top-level unit has a parent", "*", g["name"]))
            continue
        pos = tree.position(manifest["geolevels"][k - 1]["name"], parents)
        if np.any(pos < 0):
            out.append(_fail("geography", f"{rel}: {int((pos < 0).sum())} {g['name']} unit(s) whose parent is not a "
                                          f"{manifest['geolevels'][k - 1]['name']} unit", "*", g["name"]))
        elif pos.size > 1 and np.any(pos[1:] < pos[:-1]):
            out.append(_fail("geography", f"{rel}: {g['name']} units are not grouped by parent in the order of "
                                          f"the level above", "*", g["name"]))
    return out


def _margins(manifest: Mapping[str, Any], ts: TableSet, lts: list[LevelTables],
             digits: "Mapping[str, int] | GeoTree") -> dict[tuple[str, str], Any]:
    """The release's margins of error recomputed from its manifest (design, invariants, estimator)
    and, for the full estimator, the published geography's tree."""
    from pipeline.release.manifest import child_ptrs_from_tree, release_margins, variances_from_privacy

    inv = manifest["invariants"]
    levels = [g["name"] for g in manifest["geolevels"]]
    estimator = (manifest.get("estimator") or {}).get("name", "topdown")
    geo = GeoTree.of(digits, levels)
    tree = child_ptrs_from_tree(geo, [lt.geoids for lt in lts]) if estimator == "full" else None
    return release_margins(ts, variances_from_privacy(manifest["privacy"]), levels, geo.digits,
                           inv["state_totals"] is not None, inv["block_housing_units"] is not None, estimator, tree)


def _unbiased_checks(root: Path, manifest: Mapping[str, Any], ts: TableSet, lts: list[LevelTables],
                     digits: Mapping[str, int]) -> list[CheckFailure]:
    from pipeline.release.unbiased import verify_unbiased

    return verify_unbiased(root, manifest, ts, lts, _margins(manifest, ts, lts, digits), digits)


def _table_list_checks(ts: TableSet, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    """The manifest's tables are exactly the definitions' tables of the published runs, as defined."""
    runs = set(manifest["privacy"]["runs"])
    want = [t for t in ts.tables.values() if t.histogram in runs]
    listed = {t["name"]: t for t in manifest["tables"]}
    out = [_fail("tables", f"table {t.name} ({t.histogram}) of {manifest['table_definitions']} is not published "
                           f"although the {t.histogram} run is", t.name) for t in want if t.name not in listed]
    for name, t in listed.items():
        d = ts.tables.get(name)
        if d is None or d.histogram not in runs:
            out.append(_fail("tables", f"manifest lists table {name}, which {manifest['table_definitions']} does not "
                                       f"define for the published runs {sorted(runs)}", name))
            continue
        got = (t["title"], t["universe"], t["histogram"], t["lines"])
        if got != (d.title, d.universe, d.histogram, d.n_lines):
            out.append(_fail("tables", f"manifest.json table {name}: (title, universe, histogram, lines) {got} differ "
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
        return [_fail("table_rows", f"{rel}: columns {dict(found.schema)} differ from {against}: {dict(want.schema)}",
                      table, level)]
    if found.height != want.height:
        return [_fail("table_rows", f"{rel}: {found.height} rows, {against} has {want.height}", table, level)]
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
                             digits: Mapping[str, int], x_block: Any) -> list[CheckFailure]:
    """The published noisy measurements against the design and the published geography."""
    from pipeline.release.measurements import FILES, measurement_checks

    if not manifest["contents"]["measurements"] or not all((root / rel).is_file() for rel in FILES):
        return []  # a missing file is reported as such (required_files)
    from pipeline.model.design import design_from_rho

    runs = manifest["privacy"]["runs"]
    design = design_from_rho({kind: run["rho_by_level_query"] for kind, run in runs.items()})
    published = _published_histograms(root, ts, lts, digits, list(runs), x_block)
    return measurement_checks(root, design, ts.specs, lts, digits, published)


def _published_histograms(root: Path, ts: TableSet, lts: list[LevelTables], digits: Mapping[str, int],
                          kinds: Sequence[str], x_block: Any) -> dict[str, dict[str, Any]]:
    """``{kind: {level: csr (n_units, n_cells) int64}}``: the published histograms of every level.

    Persons: the microdata tabulated per block (``x_block``, csr ``(n_blocks, n_cells)``; ``None``
    when the microdata are unreadable) and summed up by GEOID prefix (the tables are consistent,
    so this is every level's published histogram). Units: solved from the tables of
    the units histogram when their lines determine every cell (H1: occupied, vacant); a kind
    whose histogram the release does not determine is left out.
    """
    import scipy.sparse as sp

    out: dict[str, dict[str, Any]] = {}
    block = lts[-1]
    if "persons" in kinds and x_block is not None:
        tree = GeoTree.of(digits, [lt.level for lt in lts])
        out["persons"] = {lt.level: _aggregate(x_block, block, lt, tree) for lt in lts}
    for kind in kinds:
        if kind == "persons":
            continue
        spec, tabs = ts.specs[kind], ts.of_kind(kind)
        if not tabs or any(t.name not in lt.counts for lt in lts for t in tabs):
            continue  # no tables, or one whose layout failed (reported)
        m = sp.vstack([t.matrix for t in tabs]).toarray().astype(np.float64)  # (lines, cells)
        if np.linalg.matrix_rank(m) < spec.n_cells:
            continue
        pinv = np.linalg.pinv(m)                                             # (cells, lines)
        hist = {}
        for lt in lts:
            c = np.hstack([lt.counts[t.name] for t in tabs]).astype(np.float64)  # (units, lines)
            hist[lt.level] = sp.csr_matrix(np.rint(c @ pinv.T).astype(np.int64))
        out[kind] = hist
    return out


def _aggregate(x: Any, block: LevelTables, lt: LevelTables, tree: GeoTree) -> Any:
    """Sum the bottom level's rows of csr ``x`` into the units of ``lt`` (their ancestors there)."""
    import scipy.sparse as sp

    pos, found = tree.parent_positions(lt.level, lt.geoids, block.level, block.geoids)
    ok = np.nonzero(found)[0]  # orphans: hierarchy
    agg = sp.csr_matrix((np.ones(ok.size, np.int64), (pos[ok], ok)), shape=(len(lt.geoids), len(block.geoids)))
    return (agg @ x).tocsr()
