"""Bring-your-own schema: a lookup-file geography (any code strings) and another spec, end to end.

The example of ``configs/ruritania.yaml`` (a synthetic country: country > region > district >
area, string codes that do not sort with their parents; an age band x sex spec, its own
strategy and tables) runs through ``dptab run``, ``dptab verify`` and ``dptab review``; a bad
lookup or unknown units are refused with exit 2 before any budget is reserved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from dptab.cli import app
from pipeline.files import sha256_file
from pipeline.inputs.lookup import lookup_problems
from pipeline.model.geography import Geography, GeographyError, lookup_levels
from pipeline.privacy.ledger import Ledger
from pipeline.release.verify import verify_release

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ruritania"
LEVELS = ["country", "region", "district", "area"]


def _config(tmp: Path, **over) -> Path:
    """configs/ruritania.yaml with its inputs copied to ``tmp/data`` and outputs under ``tmp``."""
    data = tmp / "data"
    if not data.exists():
        shutil.copytree(DATA, data)
    cfg = yaml.safe_load((ROOT / "configs" / "ruritania.yaml").read_text())
    cfg["inputs"] = {"persons": str(data / "persons.parquet"), "units": str(data / "units.parquet")}
    cfg["geography"]["lookup"] = str(data / "areas.csv")
    cfg["privacy"].update({"ledger": str(tmp / "ledger.sqlite"), "randomness": "seeded", "seed": 3})
    cfg["output"] = {"runs_dir": str(tmp / "runs"), "releases_dir": str(tmp / "releases")}
    for k, v in over.items():
        cfg[k] = v
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rur")
    cfg = _config(tmp)
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 0, out
    release = next((tmp / "releases").iterdir())
    run_dir = next(p for p in (tmp / "runs").iterdir() if p.is_dir())
    return tmp, release, run_dir


# --------------------------------------------------------------------------------------
# the hierarchy


def test_lookup_hierarchy_nests_codes_that_do_not_sort_with_their_parents() -> None:
    table = pl.DataFrame({"country": ["K"] * 4, "region": ["N", "N", "A", "A"],
                          "area": ["z9", "a1", "m5", "b2"]})
    geo = Geography.from_lookup(table, lookup_levels(["country", "region", "area"]))
    assert [lv.n_units for lv in geo.levels] == [1, 2, 4]
    region, area = geo.level("region"), geo.level("area")
    assert region.geoids.tolist() == ["A", "N"]
    # grouped by parent, then code: A's areas first although "z9" > "m5"
    assert area.geoids.tolist() == ["b2", "m5", "a1", "z9"]
    assert area.parent.tolist() == [0, 0, 1, 1]
    assert region.child_ptr.tolist() == [0, 2, 4]
    assert geo.level("area").index_of(["z9", "b2"]).tolist() == [3, 0]
    with pytest.raises(GeographyError, match="not in the geography"):
        area.index_of(["nope"])
    assert geo.lookup_frame().sort("area").equals(table.sort("area"))


def _lookup_file(tmp: Path, rows: list[tuple[str, ...]], header=("country", "region", "area")) -> Path:
    p = tmp / "lookup.csv"
    p.write_text(",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return p


@pytest.mark.parametrize("rows, column, kind, first_rows", [
    ([("K", "N", "a1"), ("K", "S", "a1")], "area", "duplicate_unit", (0, 1)),
    ([("K", "N", "a1"), ("K", "", "a2")], "region", "missing_chain", (1,)),
    ([("K", "N", "a1"), ("L", "N", "a2")], "region", "two_parents", (0, 1)),
    ([("K", "N", "a1"), ("L", "S", "a2")], "country", "several_roots", (1,)),
])
def test_bad_lookup_names_file_column_and_rows(tmp_path: Path, rows, column, kind, first_rows) -> None:
    p = _lookup_file(tmp_path, rows)
    table, problems = lookup_problems(p, ["country", "region", "area"])
    assert table is None
    hit = [q for q in problems if q.kind == kind]
    assert hit, problems
    assert hit[0].file == str(p) and hit[0].column == column and hit[0].first_rows == first_rows


def test_a_code_with_two_names_is_refused(tmp_path: Path) -> None:
    p = _lookup_file(tmp_path, [("K", "N", "a1", "North"), ("K", "N", "a2", "Nord")],
                     header=("country", "region", "area", "region_name"))
    _, problems = lookup_problems(p, ["country", "region", "area"])
    assert [(q.column, q.kind, q.first_rows) for q in problems] == [("region_name", "two_names", (0, 1))]


def test_lookup_without_a_level_column(tmp_path: Path) -> None:
    p = _lookup_file(tmp_path, [("K", "a1")], header=("country", "area"))
    _, problems = lookup_problems(p, ["country", "region", "area"])
    assert [(q.column, q.kind) for q in problems] == [("region", "missing_column")]


def _nothing_reserved(tmp: Path) -> None:
    ledger = tmp / "ledger.sqlite"
    assert not ledger.exists() or Ledger(ledger).entries() == []
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())


def test_unknown_units_and_bad_lookup_are_refused_before_any_budget(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    persons = pl.read_parquet(tmp_path / "data" / "persons.parquet")
    bad = persons.with_columns(pl.when(pl.int_range(pl.len()) % 500 == 7).then(pl.lit("E99999999"))
                               .otherwise(pl.col("geoid")).alias("geoid"))
    bad.write_parquet(tmp_path / "data" / "persons.parquet")
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2, out
    assert "persons.parquet, column 'geoid': unknown_unit" in out and "first rows (0-based): 7: E99999999" in out
    _nothing_reserved(tmp_path)
    persons.write_parquet(tmp_path / "data" / "persons.parquet")
    lookup = pl.read_csv(tmp_path / "data" / "areas.csv", infer_schema=False)
    lookup = lookup.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("RU-B")).otherwise(pl.col("region"))
                                 .alias("region"))
    lookup.write_csv(tmp_path / "data" / "areas.csv")
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2, out
    assert "areas.csv, column 'district': two_parents" in out
    _nothing_reserved(tmp_path)


def test_a_lookup_needs_level_names(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["geography"]["levels"] = "geolevels"
    cfg.write_text(yaml.safe_dump(raw))
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 2 and "geography.lookup needs geography.levels" in out
    _nothing_reserved(tmp_path)


# --------------------------------------------------------------------------------------
# the release


def test_release_verifies_and_publishes_every_unit_of_the_lookup(released) -> None:
    tmp, release, _ = released
    code, out = _cli("verify", str(release))
    assert code == 0 and "every checksum and consistency check passes" in out, out
    m = json.loads((release / "manifest.json").read_text())
    lookup = pl.read_csv(DATA / "areas.csv", infer_schema=False)
    assert [(g["name"], g["units"]) for g in m["geolevels"]] == [(lv, lookup[lv].n_unique()) for lv in LEVELS]
    assert m["geography"] == {"kind": "lookup", "file": "geography.parquet"}
    listed = {f["path"]: f["sha256"] for f in m["files"]}
    assert listed["geography.parquet"] == sha256_file(release / "geography.parquet")
    geo = pl.read_parquet(release / "geography.parquet")
    # every unit with its parent code: the lookup's own pairs
    for up, lv in zip(LEVELS[:-1], LEVELS[1:]):
        got = geo.filter(pl.col("level") == lv).select(pl.col("geoid").alias(lv), pl.col("parent").alias(up))
        assert got.sort(lv).equals(lookup.select(lv, up).unique().sort(lv))
    # the country total is the declared invariant; areas without anyone are published too
    persons = pl.read_parquet(DATA / "persons.parquet")
    assert m["invariants"]["state_totals"] == {"RU": persons.height}
    empty = set(lookup["area"]) - set(persons["geoid"])
    assert empty, "the example should have areas without records"
    a1 = pl.read_parquet(release / "tables" / "A1.parquet")
    assert set(a1.filter(pl.col("geolevel") == "area")["geoid"]) == set(lookup["area"])
    # the lookup's names where it has them (region_name, ...), "<level> <code>" where not
    names = dict(a1.filter(pl.col("line") == 1).select(pl.concat_str("geolevel", pl.lit(":"), "geoid"), "name").iter_rows())
    assert names["country:RU"] == "Ruritania" and names["region:RU-A"] == "North"
    assert names["district:RU0102"] == "North District 2"
    area = lookup["area"][0]
    assert names[f"area:{area}"] == f"area {area}"
    assert geo.filter(pl.col("level") == "region")["name"].to_list() == ["North", "South", "East"]
    # the release notes' bias table was measured on the US PL94 product: not shown here
    assert "Mean of published − true count" not in (release / "README.md").read_text()


def test_tables_are_consistent_non_negative_integers(released) -> None:
    _, release, _ = released
    geo = pl.read_parquet(release / "geography.parquet")
    for name in ("A1", "A2", "H1"):
        t = pl.read_parquet(release / "tables" / f"{name}.parquet")
        assert t["count"].dtype == pl.Int64 and t["count"].min() >= 0
        for up, lv in zip(LEVELS[:-1], LEVELS[1:]):
            child = (t.filter(pl.col("geolevel") == lv)
                     .join(geo.filter(pl.col("level") == lv).select("geoid", "parent"), on="geoid")
                     .group_by("parent", "line").agg(pl.col("count").sum()).sort("parent", "line"))
            parent = (t.filter(pl.col("geolevel") == up).select(pl.col("geoid").alias("parent"), "line", "count")
                      .sort("parent", "line"))
            assert child.equals(parent), f"{name}: {lv} does not add up to {up}"
    a1 = pl.read_parquet(release / "tables" / "A1.parquet").filter(pl.col("line").is_in([1, 2, 9]))
    wide = a1.pivot(on="line", index=["geolevel", "geoid"], values="count")
    assert (wide["1"] == wide["2"] + wide["9"]).all()
    csv = pl.read_csv(release / "csv" / "area" / "A1.csv", infer_schema=False)
    assert csv["GEO_ID"].str.starts_with("area:E").all()


def test_microdata_has_one_column_per_spec_attribute(released) -> None:
    _, release, _ = released
    micro = pl.read_parquet(release / "microdata" / "persons.parquet")
    assert micro.columns == ["geoid", "EPNUM", "age_band", "sex"]
    a1 = pl.read_parquet(release / "tables" / "A1.parquet").filter((pl.col("geolevel") == "area"))
    males = micro.filter(pl.col("sex") == 1).group_by("geoid").len()
    got = a1.filter(pl.col("line") == 2).join(males, on="geoid", how="left").with_columns(pl.col("len").fill_null(0))
    assert (got["count"] == got["len"]).all()
    assert set(micro["age_band"].unique()) <= set(range(6))


def test_verify_catches_a_rewritten_parent(released, tmp_path: Path) -> None:
    _, release, _ = released
    copy = tmp_path / release.name
    shutil.copytree(release, copy)
    geo = pl.read_parquet(copy / "geography.parquet")
    areas = geo.filter(pl.col("level") == "area")
    first = areas["geoid"][0]
    other = next(p for p in areas["parent"] if p != areas["parent"][0])
    geo.with_columns(pl.when(pl.col("geoid") == first).then(pl.lit(other)).otherwise(pl.col("parent"))
                     .alias("parent")).write_parquet(copy / "geography.parquet")
    fails = verify_release(copy)
    assert any(f.check == "checksum" or "sha256" in str(f) for f in fails), fails
    # the same edit with the manifest's checksum updated: the tables no longer nest by it
    m = json.loads((copy / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == "geography.parquet":
            f["sha256"] = sha256_file(copy / "geography.parquet")
            f["bytes"] = (copy / "geography.parquet").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(m))
    fails = [f for f in verify_release(copy) if f.check in ("hierarchy", "geography", "structure")]
    assert fails, "a unit moved to another parent must break the hierarchy checks"


def test_review_reports_the_specs_own_statistics(released) -> None:
    _, _, run_dir = released
    code, out = _cli("review", str(run_dir))
    assert code == 0, out
    metrics = pl.read_parquet(run_dir / "review" / "metrics.parquet")
    stats = set(metrics["statistic"])
    assert {"total", "A1_002", "A2_004"} <= stats and "P2_001" not in stats
    assert set(metrics["level"]) == set(LEVELS)
    mae = metrics.filter((pl.col("statistic") == "total") & (pl.col("metric") == "mae")
                         & (pl.col("estimator") == "published") & (pl.col("size_bin") == "all"))
    assert mae.filter(pl.col("level") == "country")["value"].item() == 0.0  # the declared total
    assert np.isfinite(mae["value"].to_numpy()).all()
    assert (run_dir / "review" / "report.html").is_file()


@pytest.mark.browser
def test_explorer_nests_lookup_areas_in_chromium(released, tmp_path: Path) -> None:
    from test_release_explorer import Browser, need_chromium, wait_area

    _, release, _ = released
    geo = pl.read_parquet(release / "geography.parquet")
    area = geo.filter(pl.col("level") == "area").row(0, named=True)
    district = area["parent"]
    region = geo.filter((pl.col("level") == "district") & (pl.col("geoid") == district))["parent"].item()
    a1 = pl.read_parquet(release / "tables" / "A1.parquet")
    total = a1.filter((pl.col("geoid") == area["geoid"]) & (pl.col("line") == 1))["count"].item()
    b = Browser(need_chromium(), tmp_path / "profile")
    try:
        b.open((release / "index.html").as_uri())
        n = geo.height
        assert f"{n} areas" in b.js("document.getElementById('explorer-status').textContent")
        b.type("#explorer-q", area["geoid"])
        b.wait("document.querySelectorAll('#explorer-results button').length > 0")
        b.click("document.querySelector('#explorer-results button')")
        s = wait_area(b, f"area:{area['geoid']}")
        assert s["parents"] == ["country:RU", f"region:{region}", f"district:{district}"]
        assert b.js("document.querySelector('details[data-table=A1] tr[data-line=\"1\"] td.count').textContent") \
            == f"{total:,}"
        # the district lists its areas, in the geography's order
        b.js(f"location.hash = '#area=district:{district}'")
        s = wait_area(b, f"district:{district}")
        want = geo.filter((pl.col("level") == "area") & (pl.col("parent") == district))["geoid"].to_list()
        assert s["children"] == [f"area:{g}" for g in want]
    finally:
        b.close()


# --------------------------------------------------------------------------------------
# dptab init: a starter folder that runs, and dptab validate telling what does not fit


def test_init_writes_a_starter_that_validates_runs_and_verifies(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "mine"
    code, out = _cli("init", str(d), "--levels", "nation,province,municipality", "--name", "myco")
    assert code == 0, out
    code, out = _cli("init", str(d))
    assert code == 2 and "already exist" in out  # never overwritten
    monkeypatch.chdir(tmp_path)  # paths in the starter are relative to its config, not the working folder
    code, out = _cli("synth", "--spec", str(d / "spec.yaml"), "--lookup", str(d / "areas.csv"), "--persons", "2000",
                     "--seed", "2", "--out", str(d / "data"))
    assert code == 0, out
    code, out = _cli("validate", "--config", str(d / "config.yaml"))
    assert code == 0 and "valid inputs" in out, out
    code, out = _cli("run", "--quiet", str(d / "config.yaml"))
    assert code == 0, out
    release = next((d / "releases").iterdir())
    assert verify_release(release) == []
    m = json.loads((release / "manifest.json").read_text())
    assert [g["name"] for g in m["geolevels"]] == ["nation", "province", "municipality"]
    assert m["privacy"]["runs"]["persons"]["spec"] == "spec.yaml"  # carried in privacy/, no local path
    assert (release / "privacy" / "spec.yaml").read_text() == (d / "spec.yaml").read_text()


def test_validate_tells_what_does_not_fit(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    assert _cli("init", str(d))[0] == 0
    assert _cli("synth", "--spec", str(d / "spec.yaml"), "--lookup", str(d / "areas.csv"), "--persons", "500",
                "--seed", "1", "--out", str(d / "data"))[0] == 0
    # a strategy measuring a level the geography does not have
    strategy = d / "strategy.yaml"
    good = strategy.read_text()
    strategy.write_text(good.replace("geolevels: [country,", "geolevels: [nation,").replace("  country:", "  nation:"))
    code, out = _cli("validate", "--config", str(d / "config.yaml"))
    assert code == 2 and "measures levels ['nation']" in out, out
    strategy.write_text(good)
    # an attribute code outside the spec and a unit missing from the lookup: file, column, rows
    persons = pl.read_parquet(d / "data" / "persons.parquet")
    persons.with_columns(pl.when(pl.int_range(pl.len()) == 4).then(9).otherwise(pl.col("sex")).cast(pl.Int16)
                         .alias("sex"),
                         pl.when(pl.int_range(pl.len()) == 6).then(pl.lit("nowhere")).otherwise(pl.col("geoid"))
                         .alias("geoid")).write_parquet(d / "data" / "persons.parquet")
    code, out = _cli("validate", "--config", str(d / "config.yaml"))
    assert code == 2, out
    assert "column 'sex': out_of_domain" in out and "4: 9" in out
    assert "column 'geoid': unknown_unit" in out and "6: nowhere" in out
    # a lookup that does not nest
    areas = d / "areas.csv"
    text = areas.read_text()
    assert "X,X1,X12,U0003" in text and "X,X2,X21,U0005" in text
    areas.write_text(text.replace("X,X1,X12,U0003", "X,X2,X12,U0003").replace("X,X2,X21,U0005", "Y,X2,X21,U0005"))
    code, out = _cli("validate", "--config", str(d / "config.yaml"))
    assert code == 2 and "two_parents" in out and "several_roots" in out, out


def test_full_estimator_on_a_lookup_geography(tmp_path: Path) -> None:
    """The hierarchical GLS runs on the lookup's tree; verify recomputes its per-area margins and
    checks the unbiased tables add up by the published parent codes."""
    cfg = _config(tmp_path, postprocess={"estimator": "full"})
    code, out = _cli("run", "--quiet", str(cfg))
    assert code == 0, out
    release = next((tmp_path / "releases").iterdir())
    assert verify_release(release) == []
    m = json.loads((release / "manifest.json").read_text())
    assert m["estimator"]["name"] == "full" and m["contents"]["unbiased"]
    u = pl.read_parquet(release / "tables" / "unbiased" / "A1.parquet")
    assert set(u["geolevel"]) == {"country", "region", "district"}  # every level but the bottom one
