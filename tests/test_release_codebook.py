"""What a researcher downloading a release reads first: CSVs that read right with default
settings, the codebook (README.md + codebook.json), the specs beside the table definitions,
the citation, and escaping of every configured value in the HTML and Markdown pages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import yaml
from run_helpers import needs_tool
from test_release import PRIVACY, meta
from test_tables_cases import make_case

import pipeline
from pipeline.files import sha256_file
from pipeline.model.schemas import SCHEMAS_DIR
from pipeline.model.spec import load_spec
from pipeline.release.codebook import CITATION_FILE, md_escape, project_citation
from pipeline.release.tables import TABLES_DIR, census_geo_id, load_tables
from pipeline.release.verify import verify_release
from pipeline.release.writer import write_release

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    c = make_case(5, n_blocks=40)
    return write_release(tmp_path_factory.mktemp("cb") / "releases", meta("cb-1"), c.geography, c.persons, c.units,
                         c.invariants, PRIVACY)


def _expected(release: Path, csv: Path) -> pl.DataFrame:
    level, table = csv.parent.name, csv.stem
    return pl.read_parquet(release / "tables" / f"{table}.parquet").filter(pl.col("geolevel") == level)


def test_csv_geoids_read_right_with_default_settings(release: Path) -> None:
    csvs = sorted((release / "csv").rglob("*.csv"))
    assert {p.parent.name for p in csvs} == {"nation", "state", "county", "tract", "block_group", "block"}
    states = set(pl.read_parquet(release / "tables/P1.parquet").filter(pl.col("geolevel") == "state")["geoid"])
    assert "01" in states  # a state with a leading zero: the case that used to break
    for p in csvs:
        want = _expected(release, p)
        geo_id = want.select(census_geo_id(pl.col("geoid"))).to_series().to_list()
        assert p.read_bytes().isascii(), p  # no encoding question for Excel or R
        # pandas and polars with no options at all
        pdf = pd.read_csv(p)
        assert pdf["GEO_ID"].tolist() == geo_id, p
        assert pdf["GEO_ID"].notna().all() and pdf["GEO_ID"].str[9:].tolist() == want["geoid"].to_list(), p
        assert pdf["count"].tolist() == want["count"].to_list() and pdf["line"].tolist() == want["line"].to_list()
        assert pdf["name"].tolist() == want["name"].to_list() and pdf["label"].tolist() == want["label"].to_list()
        np.testing.assert_allclose(pdf["moe90"].to_numpy(dtype=float), want["moe90"].to_numpy().astype(float))
        qdf = pl.read_csv(p)
        assert qdf["GEO_ID"].dtype == pl.Utf8 and qdf["GEO_ID"].null_count() == 0
        assert qdf["GEO_ID"].str.slice(9).to_list() == want["geoid"].to_list(), p
        assert qdf["count"].to_list() == want["count"].to_list()
    nation = pd.read_csv(release / "csv/nation/P1.csv")
    assert set(nation["GEO_ID"]) == {"0100000US"}
    county = pl.read_csv(release / "csv/county/P1.csv")
    assert county["GEO_ID"].str.slice(0, 9).unique().to_list() == ["0500000US"]


def test_geo_id_follows_the_census_summary_levels() -> None:
    got = census_geo_id(pl.Series(["", "01", "01105", "01105000100", "011050001001", "011050001001001"])).to_list()
    assert got == ["0100000US", "0400000US01", "0500000US01105", "1400000US01105000100",
                   "1500000US011050001001", "1000000US011050001001001"]
    assert census_geo_id(pl.Series(["0110500"])).to_list() == ["L070000US0110500"]  # not a Census level: no Census code


def test_codebook_files_are_listed_and_verified(release: Path) -> None:
    m = json.loads((release / "manifest.json").read_text())
    files = {f["path"]: f for f in m["files"]}
    for rel in ("README.md", "codebook.json", "tables/pl94.yaml", "tables/units.yaml"):
        assert files[rel]["sha256"] == sha256_file(release / rel), rel
    assert verify_release(release) == []
    # the specs definitions.yaml names resolve beside it, and are the specs used
    defs = yaml.safe_load((release / m["table_definitions"]).read_text())
    for key, name in (("persons_spec", "pl94"), ("units_spec", "units")):
        copied = release / "tables" / f"{defs[key]}.yaml"
        assert copied.read_bytes() == (SCHEMAS_DIR / f"{name}.yaml").read_bytes()
        assert load_spec(copied).n_cells == load_spec(name).n_cells


def test_codebook_has_every_table_line_column_and_code(release: Path) -> None:
    cb = json.loads((release / "codebook.json").read_text())
    m = json.loads((release / "manifest.json").read_text())
    ts = load_tables(TABLES_DIR / "pl94.yaml")
    assert cb["release_id"] == "cb-1" and cb["citation"] == m["citation"] and cb["software"] == m["software"]
    assert [t["name"] for t in cb["tables"]] == [t["name"] for t in m["tables"]]
    for t in cb["tables"]:
        td = ts.tables[t["name"]]
        assert [(ln["line"], ln["label"]) for ln in t["lines"]] == list(zip(td.numbers, td.labels))
        assert t["unit"] == ("persons" if td.histogram == "persons" else "housing units")
    # every column of every data file is described, with its real type
    by_path = {f["path"]: f for f in cb["files"]}
    for pattern, real in (("tables/<table>.parquet", "tables/P1.parquet"), ("microdata/persons.parquet", None),
                          ("invariants/block_housing_units.parquet", None)):
        schema = pl.read_parquet_schema(release / (real or pattern))
        cols = by_path[pattern]["columns"]
        assert [c["name"] for c in cols] == list(schema), pattern
        assert all(c["description"] and c["type"] for c in cols), pattern
    units = {c["name"]: c["unit"] for c in by_path["tables/<table>.parquet"]["columns"]}
    assert units["count"].startswith("persons") and "housing units" in units["count"] and units["moe90"] == "as count"
    assert [c["name"] for c in by_path["csv/<geolevel>/<table>.csv"]["columns"]] == pl.read_csv(
        release / "csv/state/P1.csv").columns
    # every microdata code in the data has a label; the PPMF code lists are complete
    micro = {c["name"]: c for c in by_path["microdata/persons.parquet"]["columns"]}
    race = {k["code"]: k["label"] for k in micro["CENRACE"]["codes"]}
    assert len(race) == 63 and race["01"] == "White alone" and race["63"].count(";") == 5
    assert [k["code"] for k in micro["VOTING_AGE"]["codes"]] == [1, 2]
    assert [k["code"] for k in micro["CENHISP"]["codes"]] == [1, 2]
    assert [k["code"] for k in micro["GQTYPE_PL"]["codes"]] == list(range(8))
    assert {k["code"] for k in micro["RTYPE"]["codes"]} == {"3", "5"}
    df = pl.read_parquet(release / "microdata/persons.parquet")
    for col in ("CENRACE", "VOTING_AGE", "CENHISP", "GQTYPE_PL", "RTYPE"):
        assert set(df[col].unique().to_list()) <= {k["code"] for k in micro[col]["codes"]}, col
    moe = cb["margins_of_error"]
    assert moe["level"] == 0.9 and moe["z"] == m["uncertainty"]["z"] and "post-processing" in moe["excludes"].lower()
    assert [g["summary_level"] for g in cb["geolevels"]] == ["010", "040", "050", "140", "150", "100"]


def test_readme_explains_every_table_column_and_code(release: Path) -> None:
    text = (release / "README.md").read_text()
    cb = json.loads((release / "codebook.json").read_text())
    for t in cb["tables"]:
        assert f"### {t['name']}. {t['title']}" in text
        for ln in t["lines"]:
            assert f"| {ln['line']} | {md_escape(ln['label'])} |" in text, (t["name"], ln["line"])
    for f in cb["files"]:
        for c in f.get("columns", []):
            assert f"| `{c['name']}` |" in text
            for k in c.get("codes", []):
                assert f"| `{k['code']}` | {md_escape(k['label'])} |" in text
    for needle in ("pd.read_csv", "pl.read_csv", "read.csv", "readr::read_csv", "Excel", "0100000US",
                   "90% margin of error", "quadrature", "How to cite", "dptab --version", "tables/pl94.yaml"):
        assert needle in text, needle
    assert cb["citation"] in text.replace("\n", " ")


def test_citation(release: Path) -> None:
    cff = project_citation()
    assert cff["cff-version"] == "1.2.0" and cff["version"] == pipeline.__version__
    assert (ROOT / "CITATION.cff").read_bytes() == CITATION_FILE.read_bytes()  # the package carries the root's file
    m = json.loads((release / "manifest.json").read_text())
    assert m["citation"] and "cb-1" in m["citation"] and "dptab" in m["citation"] and "0.1.0" in m["citation"]
    html = (release / "index.html").read_text()
    assert m["citation"].replace("'", "&#39;") in html


def test_configured_values_are_escaped_in_index_and_readme(tmp_path: Path) -> None:
    """A config title and a table label / title carrying HTML end up as text in both pages."""
    evil = "<script>alert(1)</script>"
    raw = yaml.safe_load((TABLES_DIR / "pl94.yaml").read_text())
    raw["tables"]["P1"]["title"] = f"RACE {evil}"
    raw["tables"]["P1"]["lines"][0]["label"] = f"Total: {evil}"
    raw["tables"]["P2"]["lines"] = [dict(ln) for ln in raw["tables"]["P2"]["lines"]]  # unshare the YAML anchor
    defs = tmp_path / "defs.yaml"
    defs.write_text(yaml.safe_dump(raw, sort_keys=False))
    c = make_case(2, n_blocks=12)
    m = meta("esc")
    m = type(m)(**{**m.__dict__, "title": f"My release {evil}"})
    path = write_release(tmp_path / "r", m, c.geography, c.persons, c.units, c.invariants, PRIVACY, tables=defs,
                         csv=False)
    for page in ("index.html", "README.md"):
        text = (path / page).read_text()
        # the only scripts of index.html are the area explorer's (tests/test_release_explorer.py)
        for tag in ('<script src="explorer/explorer.js"></script>', '<script src="explorer/areas.js"></script>'):
            text = text.replace(tag, "")
        assert "<script" not in text.lower(), page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, page
    assert re.search(r"<title>My release &lt;script&gt;", (path / "index.html").read_text())
    assert "Total: &lt;script&gt;" in (path / "README.md").read_text()
    assert verify_release(path) == []


RSCRIPT = shutil.which("Rscript")


@needs_tool(RSCRIPT, "R", "apt-get install r-base-core r-cran-readr")
def test_csv_geoids_read_right_in_r(release: Path, tmp_path: Path) -> None:
    """R's read.csv (and readr::read_csv when installed) with default settings keep GEO_ID as text."""
    assert RSCRIPT is not None, "Rscript is missing: .ci/run installs r-base-core"
    csvs = [release / "csv" / lv / "P1.csv" for lv in ("nation", "state", "county", "tract", "block_group", "block")]
    script = tmp_path / "read.R"
    script.write_text(
        "args <- commandArgs(trailingOnly = TRUE)\n"
        "out <- args[1]\n"
        "for (f in args[-1]) {\n"
        "  a <- read.csv(f)\n"
        "  cat(f, 'read.csv', class(a$GEO_ID), class(a$count), a$GEO_ID, '\\n', file = out, append = TRUE, sep = '|')\n"
        "  if (requireNamespace('readr', quietly = TRUE)) {\n"
        "    b <- readr::read_csv(f, show_col_types = FALSE, progress = FALSE)\n"
        "    cat(f, 'readr', class(b$GEO_ID), class(b$count), b$GEO_ID, '\\n', file = out, append = TRUE, sep = '|')\n"
        "  }\n"
        "}\n")
    out = tmp_path / "out.txt"
    subprocess.run([RSCRIPT, str(script), str(out), *map(str, csvs)], check=True, capture_output=True, timeout=120)
    seen = set()
    for line in out.read_text().splitlines():
        f, reader, cls, count_cls, *geo_ids = line.rstrip("|").split("|")
        want = _expected(release, Path(f)).select(census_geo_id(pl.col("geoid"))).to_series().to_list()
        assert cls == "character" and count_cls in ("integer", "numeric"), (f, reader, cls)
        assert [g.strip() for g in geo_ids] == want, (f, reader)
        seen.add((Path(f).parent.name, reader))
    assert {lv for lv, _ in seen} == {"nation", "state", "county", "tract", "block_group", "block"}
