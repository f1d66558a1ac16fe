"""The release's codebook: ``README.md`` (for people) and ``codebook.json`` (for programs).

Every release carries a data dictionary: every file, every table with every line, every
column with its type and unit, every microdata code with its label (from the histogram specs,
which are copied into the release beside ``tables/definitions.yaml`` so that its
``persons_spec`` / ``units_spec`` references resolve there), how to read the margins of error,
the citation and the software version. Both files are built from the manifest and the table
definitions, so they say nothing the manifest and the spec do not.

The citation of a release (``manifest.citation``) starts from the project's ``CITATION.cff``.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jinja2

from pipeline.model.schemas import parse_yaml
from pipeline.release.tables import (
    CENSUS_SUMMARY_LEVEL_NAMES,
    CSV_SCHEMA,
    TableError,
    TableSet,
    geo_id_prefix,
    summary_level,
)

CODEBOOK_FORMAT = "dptab-codebook/1"
#: the project's citation (a link to the repository's ``CITATION.cff``, shipped as package data)
CITATION_FILE = Path(__file__).resolve().parents[1] / "CITATION.cff"
TEMPLATES = "templates"

#: what a count is in each histogram kind's tables
COUNT_UNITS = {"persons": "persons", "units": "housing units"}

LONG_COLUMNS = {
    "geoid": "GEOID of the area as text: empty for the nation, then 2 (state FIPS), 5 (state + county), "
             "11 (+ tract), 12 (+ block group) or 15 (+ block) digits. Leading zeros are part of the code.",
    "GEO_ID": "Census-style geographic identifier: summary level (3 characters) + \"0000US\" + GEOID, e.g. "
              "0500000US01105 for Perry County, Alabama; the nation is 0100000US. It joins to GEO_ID on "
              "data.census.gov and to GEOIDFQ in TIGER/Line shapefiles; the plain GEOID is the text after "
              "the 9th character.",
    "geolevel": "geographic level of the area (see Geographic levels)",
    "name": "readable name of the area, e.g. \"Perry County, Alabama\", \"Census Tract 6868\", \"Block 1000\"",
    "table": "table id (see Tables)",
    "line": "line number in the table shell",
    "label": "label of the line in the table shell",
    "count": "published count of the line for the area: a non-negative integer, in the table's unit "
             "(persons; housing units for H1)",
    "moe90": "90% margin of error of count, in the same unit (see Margins of error); 0 marks an exact "
             "count (an invariant); empty where the level's own measurements do not determine the line",
}
MEASUREMENT_COLUMNS = {
    "run": "persons or units: which histogram the measurement is of",
    "geolevel": "geographic level of the area",
    "query": "the query measured (a marginal of the histogram spec; see the spec's queries)",
    "unit": "the area: its 0-based position in its level's published order; measurements/units.parquet "
            "gives its GEOID (join on geolevel, unit)",
    "answer": "index of the answer within the query (0-based); measurements/answers.parquet gives its label "
              "(join on run, query, answer)",
    "value": "the noisy answer: true answer + discrete Gaussian noise (an integer, may be negative)",
    "answers": "number of answers of the query (every unit has answers 0..answers-1)",
    "rows": "rows of this run, level and query in measurements/noisy/: units x answers when every "
            "answer was drawn, fewer when answers whose published parent answer is 0 were skipped",
    "variance": "exact variance of the noise of every answer of this query at this level, in squared counts",
    "sigma2": "σ² of the discrete Gaussian as an exact fraction (1/ρ of the query)",
    "answer_label": "the answer's categories, \"; \"-separated across the query's attributes",
    "geoid": "GEOID of the area (text, as in tables/)",
}
#: what each file of ``measurements/`` holds (pipeline.release.measurements), by the path shown
#: and the prefix of the release paths it describes
MEASUREMENT_FILES = {
    "measurements/noisy/run=<run>/geolevel=<geolevel>/shard-<n>.parquet": (
        "measurements/noisy/",
        "every noisy measurement that was drawn, one row per answer, as a partitioned dataset: the run "
        "(persons or units) and the geographic level are the directory names, so a dataset reader (e.g. "
        "polars scan_parquet with hive_partitioning) adds them as columns run and geolevel; one file per "
        "shard of the run's units, in unit order. Answer labels are in measurements/answers.parquet, GEOIDs "
        "in measurements/units.parquet"),
    "measurements/queries.parquet": (
        "measurements/queries.parquet", "every measured run, level and query with its exact noise variance and σ²"),
    "measurements/answers.parquet": (
        "measurements/answers.parquet", "the label of every answer of every measured query"),
    "measurements/units.parquet": (
        "measurements/units.parquet", "the GEOID of every unit number used in measurements/noisy/"),
}
UNBIASED_COLUMNS = {
    "geoid": LONG_COLUMNS["geoid"],
    "geolevel": LONG_COLUMNS["geolevel"],
    "name": LONG_COLUMNS["name"],
    "table": LONG_COLUMNS["table"],
    "line": LONG_COLUMNS["line"],
    "label": LONG_COLUMNS["label"],
    "estimate": "unbiased estimate of the line for the area (real-valued: may be fractional or negative); the best "
                "linear unbiased estimate from every level's noisy measurements. Areas add up exactly (in real "
                "numbers) to their parent, and lines to their totals",
    "se": "standard error of estimate, in the same unit (exact: from the noise design and the geography alone); "
          "estimate ± 1.645 se is a 90% confidence interval",
}
INVARIANT_COLUMNS = {
    "geoid": "15-digit block GEOID (text)",
    "housing_units": "declared number of housing units in the block (exact, published without noise)",
}

MOE = {
    "column": "moe90",
    "level": 0.9,
    "meaning": "The estimate of the line computed from the level's own noisy measurements alone (weighted least "
               "squares, before post-processing) lies within ± moe90 of the confidential count in 90% of draws "
               "of the noise. It comes from the noise design alone (the same for every area of a level) and "
               "reveals nothing about the data.",
    "standard_error": "moe90 / z",
    "excludes": "Post-processing bias: making counts whole, non-negative and consistent can shift small counts, "
                "mostly upward from zero. That bias is not in the margin of error.",
    "exact": "0 marks an exact count (an invariant).",
    "missing": "An empty margin means the level's measurements do not determine that line on their own.",
    "sums": "For a sum of several areas at the same level, standard errors add in quadrature.",
}


#: the margins of error of the full estimator (``postprocess.estimator: full``)
MOE_FULL = {
    **MOE,
    "meaning": "The full estimator's unbiased estimate of the line (tables/unbiased/, from every level's noisy "
               "measurements) lies within ± moe90 of the confidential count in 90% of draws of the noise. It is "
               "exact for every area (areas differ by how many areas they contain and sit beside), comes from "
               "the noise design and the geography alone, and reveals nothing about the data. The published "
               "integer count is the same estimate made whole, non-negative and consistent; for counts well "
               "above zero its error is about that of the unbiased estimate.",
    "excludes": "Post-processing bias: making counts whole and non-negative shifts counts near zero, mostly "
                "upward; for small counts the published count is usually closer to the truth than moe90 says.",
    "missing": "Never empty: the full estimator determines every line.",
}


#: the integer counts' bias by true size, measured by simulation on synthetic data (never on a
#: release's confidential input): `dptab experiment --compare-estimators` writes it (bias.yaml)
BIAS_NOTES_FILE = Path(__file__).parent / "templates" / "bias_synthetic.yaml"


def bias_notes(estimator: str) -> dict[str, Any] | None:
    """The release notes' bias table for ``estimator`` (``topdown`` or ``full``), or None."""
    if not BIAS_NOTES_FILE.is_file():
        return None
    raw = parse_yaml(BIAS_NOTES_FILE.read_text(encoding="utf-8"))
    for setting in raw.get("settings", []):
        if setting["setting"].split(" ")[0] == estimator:
            return {"source": raw.get("source", ""), **setting}
    return None


@lru_cache(maxsize=1)
def project_citation() -> dict[str, Any]:
    """The project's ``CITATION.cff`` as a mapping."""
    return parse_yaml(CITATION_FILE.read_text(encoding="utf-8"))


def software_citation(version: str) -> str:
    """How to cite the software (from ``CITATION.cff``), at ``version``."""
    cff = project_citation()
    authors = ", ".join(a.get("name") or " ".join(x for x in (a.get("given-names"), a.get("family-names")) if x)
                        for a in cff["authors"])
    return f"{authors}. {cff['title']} (version {version}) [software]. License {cff['license']}."


def release_citation(title: str, release_id: str, created: str, dataset_id: str, software_version: str,
                     git_commit: str | None, privacy: Mapping[str, Any]) -> str:
    """The citation of one release: the release itself, then the software that made it."""
    from fractions import Fraction

    eps = f"{float(Fraction(privacy['epsilon']['cks2020'])):.4f}"
    commit = f", commit {git_commit}" if git_commit else ""
    return (f"{title} (release {release_id}, {created[:10]}) [data set]. Differentially private P.L. 94-171 style "
            f"tables from dataset {dataset_id}; privacy-loss budget ρ = {privacy['rho']} (ε = {eps} at "
            f"δ = {privacy['delta']}); files and checksums in the release's manifest.json. Software: "
            f"{software_citation(software_version + commit)}")


def _path(p: Path | None) -> Path:
    if p is None:
        raise TableError("the table definitions and specs of a release must come from files")
    return Path(p)


def copy_specs(root: Path, ts: TableSet) -> list[Path]:
    """Copy the histogram specs the table definitions refer to beside ``tables/definitions.yaml``.

    ``persons_spec: pl94`` then resolves to ``tables/pl94.yaml`` (a name is a file of that name
    in the same folder). Returns the written paths.
    """
    raw = parse_yaml(_path(ts.source).read_text())
    out = []
    for kind in ("persons", "units"):
        ref = str(raw[f"{kind}_spec"])
        dst = root / "tables" / (Path(ref).name if Path(ref).suffix else f"{ref}.yaml")
        if dst.exists():  # e.g. a spec named "definitions": never overwrite a file of the release
            raise TableError(f"{ts.source}: {kind}_spec {ref!r} would overwrite {dst.relative_to(root)} in the release")
        shutil.copyfile(_path(ts.specs[kind].source), dst)
        out.append(dst)
    return out


def _descriptions(spec: Any) -> dict[str, str]:
    """``{attribute: description}`` from a spec's YAML (descriptions are documentation only)."""
    raw = parse_yaml(_path(spec.source).read_text())
    return {a["name"]: str(a.get("description") or "") for a in raw.get("attributes") or ()}


def _codes(attr: Any, offset: int = 0, width: int = 0) -> list[dict[str, Any]]:
    return [{"code": (f"{c + offset:0{width}d}" if width else c + offset), "label": lab}
            for c, lab in zip(attr.codes, attr.labels)]


def microdata_columns(ts: TableSet, types: Mapping[str, str]) -> list[dict[str, Any]]:
    """The PPMF columns of ``microdata/persons.parquet`` with every code and its label (from the spec),
    or the generic layout's: ``geoid``, ``EPNUM`` and one column per spec attribute."""
    spec = ts.specs["persons"]
    a = spec.attribute
    if "TABBLKST" not in types:
        generic: list[tuple[str, str, Any]] = [
            ("geoid", "code of the bottom-level unit the person is counted in", None),
            ("EPNUM", "person number, 1..N in file order (rows are sorted by unit)", None)]
        generic += [(x.name, x.name.replace("_", " "), _codes(x)) for x in spec.attributes]
        return [{"name": n, "type": types.get(n, ""), "unit": "code" if codes else COLUMN_UNITS.get(n, ""),
                 "description": d, **({"codes": codes} if codes else {})} for n, d, codes in generic]
    cols = [
        ("TABBLKST", "state FIPS code, 2 digits", None),
        ("TABBLKCOU", "county FIPS code within the state, 3 digits", None),
        ("TABTRACTCE", "census tract code within the county, 6 digits", None),
        ("TABBLKGRPCE", "block group, 1 digit (the first digit of the block)", None),
        ("TABBLK", "block code within the tract, 4 digits", None),
        ("EPNUM", "person number, 1..N in file order (rows are sorted by block)", None),
        ("RTYPE", "record type", [{"code": "3", "label": "Person in a housing unit (household)"},
                                  {"code": "5", "label": "Person in group quarters"}]),
        ("GQTYPE_PL", "household or major group-quarters type (the spec's hhgq)", _codes(a("hhgq"))),
        ("VOTING_AGE", "voting age", _codes(a("voting_age"), offset=1)),
        ("CENHISP", "Hispanic or Latino origin", _codes(a("hispanic"), offset=1)),
        ("CENRACE", "Census race: the 63 combinations of the six OMB race groups", _codes(a("cenrace"), width=2)),
    ]
    return [{"name": n, "type": types.get(n, ""), "unit": "code" if codes else COLUMN_UNITS.get(n, ""), "description": d,
             **({"codes": codes} if codes else {})} for n, d, codes in cols]


#: the unit of every numeric column that counts something (other columns are codes or text)
COLUMN_UNITS = {
    "count": "persons (housing units in tables of housing units, e.g. H1)",
    "moe90": "as count",
    "value": "persons (housing units for run = units)",
    "variance": "squared counts",
    "sigma2": "squared counts",
    "housing_units": "housing units",
    "EPNUM": "person number",
}


def _columns(descriptions: Mapping[str, str], types: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every column of a file, in file order, with its type, unit and description (a column
    without a description raises KeyError: the codebook cannot silently miss one)."""
    return [{"name": k, "type": str(types.get(k, "")), "unit": COLUMN_UNITS.get(k, ""), "description": descriptions[k]}
            for k in types]


def build_codebook(manifest: Mapping[str, Any], ts: TableSet, spec_files: Mapping[str, str]) -> dict[str, Any]:
    """The machine-readable codebook of a release (written as ``codebook.json``).

    ``manifest``: the release manifest as it stands (its ``files`` give what is present and the
    Parquet column types); ``spec_files[kind]``: the release path of each copied spec.
    """
    m = manifest
    schema_of = {f["path"]: f.get("schema", {}) for f in m["files"]}
    paths = list(schema_of)

    def first(prefix: str) -> str | None:
        return next((p for p in paths if p.startswith(prefix)), None)

    raw = parse_yaml(_path(ts.source).read_text())
    files: list[dict[str, Any]] = []
    t = next((p for p in paths if p.startswith("tables/") and p.endswith(".parquet")), None)
    if t:
        files.append({"path": "tables/<table>.parquet", "format": "Apache Parquet",
                      "description": "one file per table; every geographic level; one row per area and table line",
                      "columns": _columns(LONG_COLUMNS, schema_of[t])})
    c = first("csv/")
    if c:
        files.append({"path": "csv/<geolevel>/<table>.csv", "format": "CSV (UTF-8, comma, header row)",
                      "description": "the rows of tables/<table>.parquet for one level; the GEOID is written as GEO_ID",
                      "columns": _columns(LONG_COLUMNS, {k: str(v) for k, v in CSV_SCHEMA.items()})})
    if "microdata/persons.parquet" in schema_of:
        files.append({"path": "microdata/persons.parquet", "format": "Apache Parquet",
                      "description": "privacy-protected microdata, one row per person, Census PPMF layout; "
                                     "tabulating it gives exactly the block tables",
                      "columns": microdata_columns(ts, schema_of["microdata/persons.parquet"])})
    ub = first("tables/unbiased/")
    if ub:
        files.append({"path": "tables/unbiased/<table>.parquet", "format": "Apache Parquet",
                      "description": "the full estimator's unbiased real-valued estimates with standard errors, one "
                                     "file per table; every level above the bottom one; prefer them to the integer "
                                     "counts when adding up many areas or fitting models, where the integer "
                                     "counts' bias near zero accumulates",
                      "columns": _columns(UNBIASED_COLUMNS, schema_of[ub])})
    inv = first("invariants/")
    if inv:
        files.append({"path": inv, "format": "Apache Parquet", "description": "the declared block housing-unit invariant",
                      "columns": _columns(INVARIANT_COLUMNS, schema_of[inv])})
    for shown, (prefix, what) in MEASUREMENT_FILES.items():
        rel = first(prefix)
        if rel:
            files.append({"path": shown, "format": "Apache Parquet", "description": what,
                          "columns": _columns(MEASUREMENT_COLUMNS, schema_of[rel])})
    files += [
        {"path": m["table_definitions"], "format": "YAML",
         "description": "how every table line is defined (a filter over the histogram's attributes) and which lines add up"},
        *({"path": p, "format": "YAML", "description": f"the {k} histogram spec: attributes, codes, labels, recodes, queries"}
          for k, p in spec_files.items()),
        {"path": "README.md", "format": "Markdown", "description": "this codebook, for reading"},
        {"path": "codebook.json", "format": "JSON", "description": "this codebook, for programs"},
        {"path": "index.html", "format": "HTML", "description": "overview: contents, privacy protection, checks, files"},
        {"path": "manifest.json", "format": "JSON", "description": "machine-readable description with every file's sha256"},
    ]
    tables = []
    for td in ts.tables.values():
        if td.name not in {x["name"] for x in m["tables"]}:
            continue
        rt = raw["tables"][td.name]
        where = {int(ln["line"]): ln.get("where") or {} for ln in rt["lines"]}
        tables.append({
            "name": td.name, "title": td.title, "universe": td.universe, "histogram": td.histogram,
            "unit": COUNT_UNITS[td.histogram], "universe_filter": rt.get("where") or {},
            "lines": [{"line": n, "label": lab, "filter": where[n],
                       **({"sum_of": list(td.sums[n])} if n in td.sums else {})}
                      for n, lab in zip(td.numbers, td.labels)],
        })
    specs = {}
    for kind, path in spec_files.items():
        s = ts.specs[kind]
        desc = _descriptions(s)
        specs[kind] = {"reference": str(raw[f"{kind}_spec"]), "file": path, "name": s.name, "cells": int(s.n_cells),
                       "attributes": [{"name": at.name, "description": desc.get(at.name, ""),
                                       "codes": _codes(at)} for at in s.attributes]}
    return {
        "format": CODEBOOK_FORMAT,
        "release_id": m["release_id"], "title": m["title"], "created": m["created"], "dataset_id": m["dataset_id"],
        "software": dict(m["software"]),
        "citation": m["citation"],
        "table_definitions": m["table_definitions"],
        "specs": specs,
        "geolevels": [{"name": g["name"], "digits": g["digits"], "units": g["units"],
                       "summary_level": summary_level(g["digits"]),
                       "summary_level_name": CENSUS_SUMMARY_LEVEL_NAMES.get(summary_level(g["digits"]),
                                                                            "not a Census summary level"),
                       "GEO_ID_prefix": geo_id_prefix(g["name"], g["digits"])} for g in m["geolevels"]],
        "tables": tables,
        "files": files,
        "estimator": dict(m.get("estimator") or {"name": "topdown"}),
        # measured for the PL94 product on US geography: other products and geographies get none
        "bias_notes": (bias_notes((m.get("estimator") or {}).get("name", "topdown"))
                       if ts.name == "pl94" and not m.get("geography") else None),
        "margins_of_error": {**(MOE_FULL if (m.get("estimator") or {}).get("name") == "full" else MOE),
                             "z": m["uncertainty"]["z"], "method": m["uncertainty"]["method"]},
        "privacy": {"definition": m["privacy"]["definition"], "neighbouring": m["privacy"]["neighbouring"],
                    "rho": m["privacy"]["rho"], "delta": m["privacy"]["delta"],
                    "epsilon_cks2020": m["privacy"]["epsilon"]["cks2020"]},
    }


class _Markdown(str):
    """Text already made safe for Markdown (a code span, an escaped table cell)."""


def md_escape(value: Any) -> str:
    """Escape a value for Markdown text: ``&``, ``<`` and ``>`` become entities, so no value
    (a title, a label from a config or a code list) can inject HTML into a rendered README."""
    if isinstance(value, _Markdown):
        return value
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(value: Any) -> _Markdown:
    """A Markdown code span of ``value`` (shown verbatim: HTML is not interpreted inside it)."""
    text = str(value).replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return _Markdown(f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|"))


def _cell(value: Any) -> _Markdown:
    """A Markdown table cell: escaped, ``|`` escaped, on one line."""
    return _Markdown(md_escape(value).replace("|", "\\|").replace("\n", " "))


@lru_cache(maxsize=1)
def markdown_env() -> jinja2.Environment:
    """The Jinja2 environment of the release's Markdown (``templates/README.md.j2``).

    Every expression is escaped for Markdown on output (``finalize``), the counterpart of
    HTML autoescaping; ``| code`` renders a verbatim code span, ``| cell`` a table cell.
    """
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / TEMPLATES), autoescape=False,
                             finalize=md_escape, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["code"] = _code
    env.filters["cell"] = _cell
    return env


def render_readme(codebook: Mapping[str, Any]) -> str:
    """The text of the release's ``README.md`` from its codebook."""
    return markdown_env().get_template("README.md.j2").render(cb=codebook)


def write_codebook(root: Path, manifest: Mapping[str, Any], ts: TableSet) -> list[Path]:
    """Copy the specs and write ``README.md`` and ``codebook.json`` into ``root``; returns the paths."""
    specs = copy_specs(root, ts)
    spec_files = {k: p.relative_to(root).as_posix() for k, p in zip(("persons", "units"), specs)}
    cb = build_codebook(manifest, ts, spec_files)
    (root / "codebook.json").write_text(json.dumps(cb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (root / "README.md").write_text(render_readme(cb), encoding="utf-8")
    return [*specs, root / "README.md", root / "codebook.json"]
