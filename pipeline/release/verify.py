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

The checks that read the data files (tables, microdata, invariants, measurements, unbiased
estimates) are :func:`pipeline.release.verify_data.verify_contents`; this module checks the
folder (manifest, checksums, file list, privacy section, identity, page, explorer) and runs both.

What the release cannot show: a noisy measurement's *value* edited together with its checksum
(nothing public determines it), or a consistent rewrite of every file and the manifest. The
verdict is that of the verifier's own code: a release written by another version with a
different page or table layout is reported as differing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.errors import InputError
from pipeline.release.checks import MAX_PER_GROUP, CheckFailure
from pipeline.release.verify_data import by_content, fail, guard, verify_contents


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


def _verify_files(root: Path, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    import os
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.files import sha256_file

    out: list[CheckFailure] = []
    listed = set()
    inside = [(f, root / f.get("path", "")) for f in manifest.get("files", [])]
    # the files are hashed on a thread per core (hashlib and reads release the GIL): a release
    # with the full estimator's measurements holds hundreds of MB
    present = sorted({p for _, p in inside if root.resolve() in p.resolve().parents and p.is_file()},
                     key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = dict(zip(present, pool.map(sha256_file, present)))
    for f, p in inside:
        rel = f.get("path", "")
        listed.add(rel)
        if root.resolve() not in (p.resolve().parents):  # e.g. "../x": the manifest points outside
            out.append(fail("manifest", f"{rel} is not inside the release folder"))
            continue
        if not p.is_file():
            out.append(fail("file_missing", f"{rel} is listed in the manifest but missing"))
            continue
        digest = digests[p] if p in digests else sha256_file(p)
        if digest != f.get("sha256") or p.stat().st_size != f.get("bytes"):
            out.append(fail("checksum", f"{rel}: sha256 {digest} ({p.stat().st_size} bytes) differs from the "
                                         f"manifest's {f.get('sha256')} ({f.get('bytes')} bytes)"))
        elif p.suffix == ".parquet" and "rows" in f:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(p).metadata.num_rows
            except (OSError, pa.ArrowException) as exc:
                out.append(fail("unreadable", f"{rel}: not a readable Parquet file ({exc})"))
                continue
            if rows != f["rows"]:
                out.append(fail("rows", f"{rel}: {rows} rows, manifest says {f['rows']}"))
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "manifest.json" and rel not in listed:
            out.append(fail("file_unlisted", f"{rel} is in the release but not in the manifest"))
    return out


def verify_release(path: str | Path, *, release_id: str | None = None, regenerate: bool = True,
                   contents: bool = True, workers: int = 1) -> list[CheckFailure]:
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
    invariants, measurements, unbiased estimates): the writer runs :func:`pipeline.release.verify_data.verify_contents` on
    them in a process of its own while it writes the explorer.

    ``workers``: with 2 or more, a release of at least
    :data:`pipeline.release.writer.BACKGROUND_MIN_BLOCKS` blocks has its explorer regenerated,
    and its noisy measurements (if it carries them) checked, in processes of their own beside the
    other checks (as the writer does): the same failures, the measurements' listed after the
    other data files'.
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
    failures = [fail("manifest", e) for e in manifest_errors(manifest)]
    if failures:
        return failures
    expect = release_id if release_id is not None else root.resolve().name
    recomputed: list[dict[str, Any]] = []
    failures += guard("privacy", _verify_privacy, root, manifest, recomputed)
    failures += guard("identity", _verify_identity, root, manifest, expect, recomputed[0] if recomputed else None)
    # the explorer regenerated from the tables, once for the two checks that compare with it; in
    # a process of its own beside the other checks when those run in two (a large release)
    explorer = _ExplorerFiles(root, manifest, "process" if _in_two(manifest, workers) else "inline") \
        if regenerate else None
    failures += _verify_files(root, manifest)
    failures += guard("contents", _verify_required_files, manifest, root, explorer)
    if contents:
        failures += _contents(root, manifest, regenerate, workers)
    failures += guard("joint", _verify_joint, root, manifest)
    if explorer is not None:
        failures += guard("explorer", _verify_explorer, root, explorer)
    return failures


def _in_two(manifest: Mapping[str, Any], workers: int) -> bool:
    """Whether ``verify_release`` runs its checks in two processes: ``workers`` > 1 and a release
    of at least :data:`pipeline.release.writer.BACKGROUND_MIN_BLOCKS` blocks (below, starting a
    process costs more than it saves)."""
    from pipeline.release.writer import BACKGROUND_MIN_BLOCKS

    blocks = int(manifest["geolevels"][-1]["units"]) if manifest.get("geolevels") else 0
    return workers > 1 and blocks >= BACKGROUND_MIN_BLOCKS


class _ExplorerFiles:
    """:func:`explorer_files` of a release, made when first asked for (``mode`` of
    :class:`pipeline.release.streams.Background`: ``"process"`` starts it now, beside the other
    checks) and kept for the next check that compares with them."""

    def __init__(self, root: Path, manifest: Mapping[str, Any], mode: str) -> None:
        from pipeline.release.streams import Background

        self._made = Background("explorer check", explorer_files, (root, manifest), mode)
        self._files: dict[str, str] | None = None

    def files(self) -> dict[str, str]:
        if self._files is None:
            self._files = self._made.result()
        return self._files


def _contents(root: Path, manifest: Mapping[str, Any], regenerate: bool, workers: int) -> list[CheckFailure]:
    """:func:`verify_contents`, its noisy measurements' half in a process of its own when that
    pays (``workers`` > 1, a large release with measurements: at national scale ~15 billion
    rows with the full estimator, checked beside the tables, microdata and unbiased estimates)."""
    from pipeline.release.streams import Background

    if not _in_two(manifest, workers) or not (manifest.get("contents") or {}).get("measurements"):
        return verify_contents(root, manifest, regenerate)
    measurements = Background("measurement check", verify_contents, (root, manifest, regenerate, "measurements"),
                              "process")
    try:
        data = verify_contents(root, manifest, regenerate, "data")
    except BaseException:
        measurements.cancel()
        raise
    return data + measurements.result()


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
    return [fail("joint", f"{int(row[rule])} unit(s) break the rule {rule} although the release holds persons "
                           "to its housing units (joint.households)", "P1", row["geolevel"])
            for row in v.iter_rows(named=True) for rule in RULES if row[rule]]


def _verify_identity(root: Path, manifest: Mapping[str, Any], expect: str,
                     privacy: Mapping[str, Any] | None) -> list[CheckFailure]:
    """Release id = folder name; a seed iff randomness is seeded; index.html = the manifest's page.

    ``privacy``: the recomputed privacy section (its key order is the writer's; manifest.json is
    stored with sorted keys), used for the page when it equals the manifest's.
    """
    out = []
    if manifest["release_id"] != expect:
        out.append(fail("identity", f"manifest.json: release_id {manifest['release_id']!r} differs from the "
                                     f"release folder's name {expect!r}"))
    seeded, seed = manifest["randomness"] == "seeded", manifest["seed"]
    if seeded != (seed is not None):
        out.append(fail("identity", f"manifest.json: randomness {manifest['randomness']!r} with seed {seed!r}; "
                                     "a seed is recorded iff the randomness is seeded"))
    index = root / "index.html"
    if index.is_file():
        from pipeline.release.html import render_index

        m = dict(manifest)  # the page is rendered before its own entry joins the file list
        m["files"] = [f for f in manifest["files"] if f["path"] != "index.html"]
        if privacy is not None and privacy == manifest["privacy"]:
            m["privacy"] = privacy
        if index.read_text(encoding="utf-8") != render_index(m):
            out.append(fail("identity", "index.html differs from the page manifest.json renders to (the manifest "
                                         "or the page was edited after the release was written)"))
    return out


def required_files(manifest: Mapping[str, Any], spec_files: Iterable[str] = ()) -> set[str]:
    """Relative paths a release must hold by its manifest's own settings (besides manifest.json).

    Every published table as Parquet (and per geolevel as CSV when ``contents.csv``), the table
    definitions and the specs they name (``spec_files``), the codebook (``README.md``,
    ``codebook.json``), the microdata, each run's strategy copy, the block housing-unit file when
    that invariant is declared, the noisy measurements' lookups when ``contents.measurements``
    (their parts, one per run shard, are listed by the manifest and checked by their contents),
    and index.html.
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
    from pipeline.model.schemas import parse_yaml

    defs = Path(manifest["table_definitions"])
    raw = parse_yaml((root / defs).read_text())
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


def _verify_explorer(root: Path, explorer: _ExplorerFiles) -> list[CheckFailure]:
    """The explorer's files are exactly those the writer makes from the published tables."""
    from pipeline.files import sha256_file

    out = []
    for rel, want in sorted(explorer.files().items()):
        path = root / rel
        if path.is_file() and sha256_file(path) != want:
            out.append(fail("explorer", f"{rel} differs from the explorer data made from the release's tables"))
    return out


def _verify_required_files(manifest: Mapping[str, Any], root: Path, explorer: _ExplorerFiles | None
                           ) -> list[CheckFailure]:
    listed = {f["path"] for f in manifest["files"]}
    # the explorer's files are those the tables make (regenerated), or, in the writer's
    # self-check (``explorer`` None), the ones it has just listed
    made = set(explorer.files()) if explorer is not None else {p for p in listed if p.startswith("explorer/")}
    need = required_files(manifest, _spec_copies(root, manifest)) | made
    s = manifest["contents"]
    why = f"csv {s['csv']}, measurements {s['measurements']}, tables {[t['name'] for t in manifest['tables']]}"
    out = [fail("file_missing", f"{p} is required by the manifest's settings ({why}) but not listed in its files")
           for p in sorted(need - listed)]
    if s["measurements"]:  # the noisy measurement parts: as many as the run had shards
        from pipeline.release.measurements import is_part

        need |= {p for p in listed if is_part(p)}
    out += [fail("file_unexpected", f"{p} is listed in the manifest but is not part of a release with these "
                                     f"settings ({why})") for p in sorted(listed - need)]
    seen: set[str] = set()
    for f in manifest["files"]:
        if f["path"] in seen:
            out.append(fail("manifest", f"{f['path']} is listed twice in the manifest's files"))
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
            out.append(fail("privacy", f"{rel} (the {kind} run's strategy) is missing: the privacy section "
                                        "cannot be recomputed"))
            continue
        try:
            loaded[kind] = by_content(load_strategy, p)
        except StrategyError as exc:
            out.append(fail("privacy", f"{rel}: {exc}"))
    if out:
        return out
    got = dict(privacy_parameters(loaded, privacy["delta"]))
    recomputed.append(got)
    diffs = _json_diff(got, privacy, "privacy")
    files = ", ".join(run["strategy_file"] for run in privacy["runs"].values())
    return [fail("privacy", f"manifest.json {d} (recomputed from {files} at delta {privacy['delta']})")
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


