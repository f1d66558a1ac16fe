"""``dptab verify RELEASE_DIR``: recompute every checksum and every consistency check of a release.

Works from the files alone (no run directory, no geography object): the manifest gives the
levels and their GEOID lengths, the tables are re-read from Parquet and pivoted back to
``(n_units, n_lines)`` arrays, the household population comes from the protected microdata,
and the microdata are re-tabulated to the block tables they must reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import polars as pl

from pipeline.errors import InputError
from pipeline.release.checks import CheckFailure, Invariants, run_checks
from pipeline.release.microdata import MicrodataError, histogram_from_microdata
from pipeline.release.tables import LevelTables, TableSet, load_tables, tabulate, tabulate_vector


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

    from pipeline.release.writer import MANIFEST_SCHEMA

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
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(p).metadata.num_rows
            if rows != f["rows"]:
                out.append(_fail("rows", f"{rel}: {rows} rows, manifest says {f['rows']}"))
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "manifest.json" and rel not in listed:
            out.append(_fail("file_unlisted", f"{rel} is in the release but not in the manifest"))
    return out


def read_release_tables(root: Path, manifest: Mapping[str, Any], ts: TableSet) -> tuple[list[LevelTables], list[CheckFailure]]:
    """Pivot ``tables/*.parquet`` back to per-level arrays; report rows that break the layout."""
    levels = [g["name"] for g in manifest["geolevels"]]
    geoids: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, np.ndarray]] = {lv: {} for lv in levels}
    problems: list[CheckFailure] = []
    published = {t["name"] for t in manifest["tables"]}
    for t in ts.tables.values():
        path = root / "tables" / f"{t.name}.parquet"
        if t.name not in published:
            continue
        if not path.is_file():
            problems.append(_fail("file_missing", f"tables/{t.name}.parquet (listed in the manifest's tables)", t.name))
            continue
        df = pl.read_parquet(path, columns=["geoid", "geolevel", "line", "label", "count"])
        for lv in levels:
            sub = df.filter(pl.col("geolevel") == lv).sort(["geoid", "line"])
            if sub.height == 0:
                problems.append(_fail("table_layout", f"{t.name} has no rows at level {lv}", t.name, lv))
                continue
            n = sub.height // t.n_lines
            lines = sub["line"].to_numpy()
            label_of = dict(zip(t.numbers, t.labels))
            wrong_label = sub.select(
                (pl.col("label") != pl.col("line").replace_strict(label_of, default=None, return_dtype=pl.Utf8))
                .fill_null(True).any()).item()
            if (sub.height % t.n_lines or not np.array_equal(lines, np.tile(np.asarray(t.numbers), n))
                    or wrong_label):
                problems.append(_fail("table_layout", f"{t.name} at {lv}: rows are not every unit x lines "
                                      f"{t.numbers[0]}..{t.numbers[-1]} with the shell's labels", t.name, lv))
                continue
            g = sub["geoid"].gather_every(t.n_lines).to_numpy().astype(str)
            if lv in geoids and not np.array_equal(geoids[lv], g):
                problems.append(_fail("table_layout", f"{t.name} at {lv}: units differ from the other tables", t.name, lv))
                continue
            geoids[lv] = g
            counts[lv][t.name] = sub["count"].to_numpy().reshape(n, t.n_lines).astype(np.int64)
    return [LevelTables(lv, geoids[lv], counts[lv]) for lv in levels if lv in geoids], problems


def _microdata_checks(root: Path, ts: TableSet, lts: list[LevelTables], digits: Mapping[str, int],
                      manifest_persons: int) -> list[CheckFailure]:
    """Household population per level from the microdata; block tables re-tabulated from it."""
    path = root / "microdata" / "persons.parquet"
    if not path.is_file():
        return [_fail("file_missing", "microdata/persons.parquet (every release carries its microdata)")]
    if not lts:
        return []
    try:
        persons = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        return [_fail("unreadable", f"microdata/persons.parquet: {exc}")]
    if persons.height != manifest_persons:
        return [_fail("microdata", f"{persons.height} microdata rows, manifest says {manifest_persons} persons")]
    block = lts[-1]
    spec = ts.specs["persons"]
    try:
        unit, cell, count = histogram_from_microdata(persons, block.geoids, spec)
    except (MicrodataError, ValueError) as exc:
        return [_fail("microdata", str(exc))]
    import scipy.sparse as sp

    x = sp.csr_matrix((count, (unit, cell)), shape=(len(block.geoids), spec.n_cells), dtype=np.int64)
    out: list[CheckFailure] = []
    for t in ts.of_kind("persons"):
        if t.name in block.counts:
            got = tabulate(x, t)
            rows, cols = np.nonzero(got != block.counts[t.name])
            for r, c in list(zip(rows, cols))[:20]:
                out.append(CheckFailure("microdata", t.name, int(t.numbers[c]), block.level, str(block.geoids[r]),
                                        int(got[r, c]), int(block.counts[t.name][r, c]),
                                        "microdata re-tabulated (expected) vs published block table (found)"))
    # check lines (e.g. household population) at every level, by GEOID prefix of the blocks
    for c in ts.check_lines.values():
        if c.histogram != "persons":
            continue
        per_block = tabulate_vector(x, c.vector)
        for lt in lts:
            d = digits[lt.level]
            pref = block.geoids.astype(f"<U{d}") if d else np.full(len(block.geoids), "", dtype="<U1")
            pos = np.searchsorted(lt.geoids, pref)
            ok = (pos < len(lt.geoids)) & (lt.geoids[np.minimum(pos, len(lt.geoids) - 1)] == pref)
            lt.check_lines[c.name] = np.bincount(pos[ok], weights=per_block[ok], minlength=len(lt.geoids)).astype(np.int64)
    return out


def verify_release(path: str | Path) -> list[CheckFailure]:
    """Every failure of a release folder (empty list: all checksums and checks pass).

    Raises :class:`ReleaseFormatError` if ``path`` has no readable ``manifest.json``.
    """
    root = Path(path)
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ReleaseFormatError(f"{root}: not a release (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise ReleaseFormatError(f"{mpath}: not valid JSON ({exc})") from None
    failures = [_fail("manifest", e) for e in manifest_errors(manifest)]
    if failures:
        return failures
    failures += _verify_files(root, manifest)
    try:
        failures += _verify_contents(root, manifest)
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError) as exc:
        # a damaged file (already reported by its checksum) must not hide the other failures
        failures.append(_fail("unreadable", f"content checks stopped: {type(exc).__name__}: {exc}"))
    return failures


def _verify_contents(root: Path, manifest: Mapping[str, Any]) -> list[CheckFailure]:
    failures: list[CheckFailure] = []
    defs = root / manifest["table_definitions"]
    if root.resolve() not in defs.resolve().parents or not defs.is_file():
        return [_fail("file_missing", f"table definitions {manifest['table_definitions']} not found in the release")]
    ts = load_tables(defs.resolve())
    digits = {g["name"]: int(g["digits"]) for g in manifest["geolevels"]}
    lts, layout = read_release_tables(root, manifest, ts)
    failures += layout
    for lt in lts:
        want = next(g["units"] for g in manifest["geolevels"] if g["name"] == lt.level)
        if len(lt.geoids) != want:
            failures.append(_fail("table_layout", f"{len(lt.geoids)} units published, manifest says {want}", "*", lt.level))
    failures += _microdata_checks(root, ts, lts, digits, int(manifest["persons"]))
    inv = manifest.get("invariants") or {}
    block_geoids = block_hu = None
    if inv.get("block_housing_units"):
        ipath = root / inv["block_housing_units"]["file"]
        if ipath.is_file():
            idf = pl.read_parquet(ipath).sort("geoid")
            block_geoids, block_hu = idf["geoid"].to_numpy().astype(str), idf["housing_units"].to_numpy()
        else:
            failures.append(_fail("file_missing", f"{inv['block_housing_units']['file']} (declared invariant) is missing"))
    invariants = Invariants(inv.get("state_totals"), block_geoids, block_hu)
    failures += run_checks(ts, lts, digits, invariants)
    return failures
