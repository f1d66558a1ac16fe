"""The schemas are package data: a non-editable install must carry every file the library reads
from ``pipeline/schemas`` (specs, strategies, table shells, geolevels, contract, geography names).
The check is against the patterns setuptools is given, so a new sub-folder that the patterns
miss fails here rather than in a user's install."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_schema_file_is_package_data() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["pipeline"]
    pkg = ROOT / "pipeline"
    files = [p.relative_to(pkg).as_posix() for p in (pkg / "schemas").rglob("*") if p.is_file()]
    assert len(files) > 10
    missed = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/")
                                          for pat in patterns)]
    assert not missed, f"not in [tool.setuptools.package-data]: {missed}"


def test_the_root_schemas_folder_is_the_package_one() -> None:
    assert (ROOT / "schemas").resolve() == (ROOT / "pipeline" / "schemas").resolve()
