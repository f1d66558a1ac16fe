"""Release folders: atomic write, refusal to overwrite, manifest, index.html, verify (pipeline.release*)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_tables_cases import make_case
from typer.testing import CliRunner

import pipeline.release.writer as release_mod
from dptab.cli import app
from pipeline.files import sha256_file
from pipeline.model.histogram import SparseHistogram
from pipeline.model.strategy import load_strategy
from pipeline.release.manifest import (
    ReleaseCheckError,
    ReleaseError,
    ReleaseExistsError,
    ReleaseMetadata,
    privacy_parameters,
)
from pipeline.release.verify import ReleaseFormatError, manifest_errors, verify_release
from pipeline.release.writer import write_release

PRIVACY = privacy_parameters({"persons": load_strategy("census2020_pl94"), "units": load_strategy("census2020_units")})


def meta(rid: str = "rel-1") -> ReleaseMetadata:
    return ReleaseMetadata(rid, "synthetic-test", "0.1.0", "ab" * 32, git_commit="0123abc", seed=7, title="test release")


def measurement_file(tmp: Path, n_units: int, extra: bool = False, sigma2: str = "4097/5", name: str = "m") -> Path:
    """A run measurement file of the contract (docs/contracts.md, with its metadata) for the
    block level: ``extra`` adds a column beyond the contract, ``sigma2`` is the rows' σ² text."""
    import json

    from run_helpers import write_parquet_with_metadata

    rng = np.random.default_rng(0)
    df = pl.DataFrame({
        "unit": np.arange(n_units, dtype=np.int64), "query": ["total"] * n_units,
        "answer": np.zeros(n_units, dtype=np.int32), "value": rng.integers(-3, 20, n_units),
        "variance": np.full(n_units, 819.4), "sigma2": [sigma2] * n_units,
    })
    if extra:
        df = df.with_columns(pl.lit(1).alias("true_value"))
    p = tmp / name / "shard-00000.parquet"
    p.parent.mkdir()
    from pipeline.model.design import design_from_rho

    # the metadata lists every query of the block level with the design's σ², but "total" with ``sigma2``
    d = design_from_rho({k: r["rho_by_level_query"] for k, r in PRIVACY["runs"].items()})
    queries = [[m.query, sigma2 if m.query == "total" else f"{m.sigma2.numerator}/{m.sigma2.denominator}",
                m.variance] for m in d.measurements if m.kind == "persons" and m.level == "block"]
    meta = {b"dptab.level": b"block", b"dptab.units": f"0:{n_units}".encode(), b"dptab.full": b"True",
            b"dptab.strategy": b"test", b"dptab.queries": json.dumps(queries).encode()}
    write_parquet_with_metadata(p, df.to_arrow(), meta)
    return p


def full_measurement_files(tmp: Path, geography, privacy) -> dict:
    """A complete measurement file per (kind, level) of the design: every answer of every unit
    (as ``privacy.full_measurements`` draws them), with the design's variance and sigma2."""
    from run_helpers import write_run_measurements

    from pipeline.model.design import design_from_rho
    from pipeline.model.spec import load_spec

    rng = np.random.default_rng(0)
    d = design_from_rho({k: r["rho_by_level_query"] for k, r in privacy["runs"].items()})
    out: dict = {}
    for kind, run in privacy["runs"].items():
        spec = load_spec(run["spec"])
        for lv in run["rho_by_level_query"]:
            n = geography.level(lv).n_units
            frames, queries = [], []
            for m in (m for m in d.measurements if m.kind == kind and m.level == lv):
                q = m.query
                na = spec.query(q).n_answers
                s2 = f"{m.sigma2.numerator}/{m.sigma2.denominator}"
                frames.append(pl.DataFrame({
                    "unit": np.repeat(np.arange(n, dtype=np.int64), na), "query": [q] * (n * na),
                    "answer": np.tile(np.arange(na, dtype=np.int32), n), "value": rng.integers(-3, 20, n * na),
                    "variance": np.full(n * na, m.variance), "sigma2": [s2] * (n * na)}))
                queries.append((q, s2, m.variance))
            path = tmp / f"m_{kind}_{lv}" / "shard-00000.parquet"
            path.parent.mkdir()
            write_run_measurements(path, pl.concat(frames), lv, (0, n), queries)
            out[(kind, lv)] = [path]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One release written once for the read-only tests (copied before any tampering)."""
    tmp = tmp_path_factory.mktemp("rel")
    c = make_case(0)
    mf = full_measurement_files(tmp, c.geography, PRIVACY)
    path = write_release(tmp / "releases", meta(), c.geography, c.persons, c.units, c.invariants, PRIVACY,
                         measurement_files=mf)
    return c, path


def copy_of(built, tmp_path: Path) -> Path:
    dst = tmp_path / built[1].name  # a release's folder is named by its id
    shutil.copytree(built[1], dst)
    return dst


def test_layout_manifest_and_verify(built) -> None:
    c, path = built
    for rel in ["manifest.json", "index.html", "tables/P1.parquet", "tables/H1.parquet", "csv/block/P2.csv",
                "csv/nation/P5.csv", "microdata/persons.parquet", "invariants/block_housing_units.parquet",
                "measurements/noisy/run=persons/geolevel=block/shard-00000.parquet"]:
        assert (path / rel).is_file(), rel
    assert not list(path.parent.glob(".*tmp*"))  # the temporary directory was renamed away
    m = json.loads((path / "manifest.json").read_text())
    assert manifest_errors(m) == []
    assert m["privacy"]["runs"]["persons"]["rho"] == "293764/114921"
    assert rho_composes(m)  # the total is the exact sum of the runs' ρ
    files = {f["path"]: f for f in m["files"]}
    assert files["tables/P1.parquet"]["sha256"] == sha256_file(path / "tables/P1.parquet")
    assert files["microdata/persons.parquet"]["rows"] == int(c.block_dense.sum())
    assert m["persons"] == int(c.block_dense.sum()) and m["seed"] == 7
    assert m["invariants"]["state_totals"] == {k: int(v) for k, v in sorted(c.invariants.state_totals.items())}
    p1 = pl.read_parquet(path / "tables/P1.parquet")
    assert p1.columns == ["geoid", "geolevel", "name", "table", "line", "label", "count", "moe90"]
    assert p1.height == 71 * sum(lv.n_units for lv in c.geography.levels)
    nat = p1.filter((pl.col("geolevel") == "nation") & (pl.col("line") == 1))
    assert nat["count"][0] == int(c.block_dense.sum()) and nat["moe90"][0] == 0.0  # invariant total
    # the CSV is the same rows with the GEOID as a Census GEO_ID, read with default settings
    csv = pl.read_csv(path / "csv/county/P1.csv")
    county = p1.filter(pl.col("geolevel") == "county")
    assert csv.columns == ["GEO_ID", "geolevel", "name", "table", "line", "label", "count", "moe90"]
    assert (csv["GEO_ID"].str.slice(9) == county["geoid"]).all() and (csv["GEO_ID"].str.slice(0, 9) == "0500000US").all()
    assert csv.drop("GEO_ID").equals(county.drop("geoid", "moe90").with_columns(
        pl.col("line").cast(pl.Int64)).hstack([csv["moe90"]]))
    assert np.allclose(csv["moe90"].to_numpy(), county["moe90"].to_numpy())
    meas = pl.read_parquet(path / "measurements/noisy/", hive_partitioning=True)  # as a reader sees it
    assert meas.columns == ["unit", "query", "answer", "value", "variance", "sigma2", "run", "geolevel"]
    units = pl.read_parquet(path / "measurements/units.parquet")
    blocks = (meas.filter((pl.col("geolevel") == "block") & (pl.col("query") == "total"))
              .join(units, on=["geolevel", "unit"], how="left", maintain_order="left"))
    assert blocks["geoid"].to_list() == c.geography.level("block").geoids.tolist()
    queries = pl.read_parquet(path / "measurements/queries.parquet")
    assert queries.columns == ["run", "geolevel", "query", "answers", "rows", "variance", "sigma2"]
    assert queries["rows"].sum() == meas.height
    labels = pl.read_parquet(path / "measurements/answers.parquet").filter(
        (pl.col("run") == "persons") & (pl.col("query") == "total"))
    assert labels["answer_label"].to_list() == ["Total"]
    assert verify_release(path) == []


def rho_composes(m) -> bool:
    from fractions import Fraction

    return Fraction(m["privacy"]["rho"]) == sum(Fraction(r["rho"]) for r in m["privacy"]["runs"].values())


def test_index_html_is_self_contained(built) -> None:
    """No external asset or link; the only links are relative links to files of the release,
    and every file of the manifest is linked with its checksum (format change: the files table
    used to show paths without links). The only scripts are the area explorer's, by relative
    path from ``explorer/`` (format change: the page had no script before the explorer)."""
    page = (built[1] / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>\s*</script>", page)
    assert scripts == ['<script src="explorer/explorer.js"></script>', '<script src="explorer/areas.js"></script>']
    assert all((built[1] / "explorer" / n).is_file() for n in ("explorer.js", "areas.js"))
    html = page
    for tag in scripts:
        html = html.replace(tag, "")
    assert not re.search(r"(?i)(https?:|//[a-z0-9]|src\s*=|@import|url\(|<script|<link)", html)
    hrefs = re.findall(r'href\s*=\s*"([^"]*)"', html)
    assert len(hrefs) == len(re.findall(r"(?i)href\s*=", html))  # every href is a quoted attribute
    for h in hrefs:
        assert not h.startswith(("/", ".")) and ":" not in h and (built[1] / h).is_file(), h
    m = json.loads((built[1] / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] != "index.html":  # listed after the page is written
            assert f'href="{f["path"]}"' in html and f["sha256"] in html, f["path"]
    assert 'href="manifest.json"' in html and 'href="README.md"' in html
    assert "margin of error" in html and "How to cite" in html and "17.14" in html  # CKS ε of the persons run


def test_existing_release_id_is_refused(built, tmp_path) -> None:
    c, path = built
    before = sha256_file(path / "manifest.json")
    with pytest.raises(ReleaseExistsError):
        write_release(path.parent, meta(), c.geography, c.persons, c.units, c.invariants, PRIVACY)
    assert sha256_file(path / "manifest.json") == before


def test_failure_midway_leaves_nothing(monkeypatch, tmp_path) -> None:
    c = make_case(1)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(release_mod, "microdata_from_blocks", boom)
    with pytest.raises(OSError, match="simulated"):
        write_release(tmp_path, meta("rel-x"), c.geography, c.persons, c.units, c.invariants, PRIVACY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers, min_blocks", [(1, 20_000), (2, 20_000), (2, 0)])
def test_inconsistent_histograms_are_not_published(tmp_path, monkeypatch, workers, min_blocks) -> None:
    """In one process, with the microdata on a thread, and with it in a process of its own
    (large releases): the failed checks reach the caller, the folder is removed with nothing
    still writing into it (the table lanes and the child stopped first), and nothing is left."""
    c = make_case(3)
    h = c.persons["block"]
    count = h.count.copy()
    count[0] += 1  # one block no longer sums to its block group
    c.persons["block"] = SparseHistogram("block", h.n_units, h.n_cells, h.unit, h.cell, count)
    monkeypatch.setattr(release_mod, "BACKGROUND_MIN_BLOCKS", min_blocks)
    with pytest.raises(ReleaseCheckError) as err:
        write_release(tmp_path, meta("rel-bad"), c.geography, c.persons, c.units, c.invariants, PRIVACY,
                      workers=workers)
    assert any(f.check == "hierarchy" for f in err.value.failures)
    assert list(tmp_path.iterdir()) == []


def test_measurement_file_with_extra_columns_is_refused(tmp_path) -> None:
    c = make_case(1)
    bad = measurement_file(tmp_path, c.geography.level("block").n_units, extra=True, name="bad")
    with pytest.raises(ReleaseError, match="exactly the columns"):
        write_release(tmp_path / "out", meta("rel-m"), c.geography, c.persons, c.units, c.invariants, PRIVACY,
                      measurement_files={("persons", "block"): [bad]})
    assert list((tmp_path / "out").iterdir()) == []


def test_measurement_file_with_another_sigma2_is_refused(tmp_path) -> None:
    """The rows published are the ones the manifest's design describes: a run file drawn with
    another σ² than the release's privacy section stops the release."""
    c = make_case(1)
    other = measurement_file(tmp_path, c.geography.level("block").n_units, sigma2="1/1")
    with pytest.raises(ReleaseError, match="sigma2 1/1"):
        write_release(tmp_path / "out", meta("rel-s"), c.geography, c.persons, c.units, c.invariants, PRIVACY,
                      measurement_files={("persons", "block"): [other]})
    assert list((tmp_path / "out").iterdir()) == []


def test_verify_detects_a_modified_file(built, tmp_path) -> None:
    path = copy_of(built, tmp_path)
    p = path / "csv" / "block" / "P1.csv"
    p.write_bytes(p.read_bytes().replace(b",Total:,", b",Total:,9", 1))
    fails = verify_release(path)
    assert [f.check for f in fails] == ["checksum", "table_rows"] and "csv/block/P1.csv" in fails[0].detail
    assert "csv/block/P1.csv" in fails[1].detail and "tables/P1.parquet" in fails[1].detail  # CSV vs Parquet
    (path / "extra.txt").write_text("x")
    assert "file_unlisted" in {f.check for f in verify_release(path)}


def test_verify_catches_a_consistently_rehashed_inconsistent_table(built, tmp_path) -> None:
    """Someone edits a count and updates the manifest's checksum: the checks still catch it."""
    path = copy_of(built, tmp_path)
    t = path / "tables" / "P5.parquet"
    df = pl.read_parquet(t)
    row = df.with_row_index().filter((pl.col("geolevel") == "tract") & (pl.col("line") == 8))["index"][0]
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == row).then(pl.col("count") + 5)
                         .otherwise(pl.col("count")).alias("count"))
    df.write_parquet(t)
    m = json.loads((path / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == "tables/P5.parquet":
            f["sha256"], f["bytes"] = sha256_file(t), t.stat().st_size
    (path / "manifest.json").write_text(json.dumps(m))
    fails = verify_release(path)
    checks = {(f.check, f.table, f.geolevel) for f in fails}
    assert ("hierarchy", "P5", "tract") in checks      # tract line 8 != sum over its block groups
    assert ("hierarchy", "P5", "county") in checks     # county line 8 != sum over its tracts
    assert ("additivity", "P5", "tract") in checks     # line 7 != 8 + 9 + 10


def test_verify_cli_exit_codes(built, tmp_path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(built[1])])
    assert ok.exit_code == 0, ok.output
    path = copy_of(built, tmp_path)
    (path / "microdata" / "persons.parquet").write_bytes(b"garbage")
    bad = runner.invoke(app, ["verify", str(path)])
    assert bad.exit_code == 1 and "checksum" in bad.output
    none = runner.invoke(app, ["verify", str(tmp_path)])
    assert none.exit_code == 2
    with pytest.raises(ReleaseFormatError):
        verify_release(tmp_path)


def test_verify_checks_microdata_against_block_tables(built, tmp_path) -> None:
    path = copy_of(built, tmp_path)
    mp = path / "microdata" / "persons.parquet"
    df = pl.read_parquet(mp)
    df = df.with_columns(pl.when(pl.col("EPNUM") == 1).then(pl.lit("02")).otherwise(pl.col("CENRACE")).alias("CENRACE"))
    if df["CENRACE"][0] == pl.read_parquet(mp)["CENRACE"][0]:
        df = df.with_columns(pl.when(pl.col("EPNUM") == 1).then(pl.lit("03")).otherwise(pl.col("CENRACE")).alias("CENRACE"))
    df.write_parquet(mp)
    assert "microdata" in {f.check for f in verify_release(path)}


def test_verify_refuses_paths_outside_the_release(built, tmp_path) -> None:
    path = copy_of(built, tmp_path)
    (tmp_path / "outside.txt").write_text("x")
    m = json.loads((path / "manifest.json").read_text())
    m["files"].append({"path": "../outside.txt", "bytes": 1, "sha256": sha256_file(tmp_path / "outside.txt")})
    (path / "manifest.json").write_text(json.dumps(m))
    assert any(f.check == "manifest" and "outside" in f.detail for f in verify_release(path))


def test_release_without_csv(tmp_path) -> None:
    c = make_case(8, n_blocks=20)
    path = write_release(tmp_path, meta("rel-nocsv"), c.geography, c.persons, c.units, c.invariants, PRIVACY, csv=False)
    assert not (path / "csv").exists() and (path / "tables" / "P1.parquet").is_file()
    assert "csv/" not in (path / "index.html").read_text() and verify_release(path) == []


def test_verify_catches_a_level_deleted_from_a_table(built, tmp_path) -> None:
    path = copy_of(built, tmp_path)
    t = path / "tables" / "P3.parquet"
    pl.read_parquet(t).filter(pl.col("geolevel") != "block").write_parquet(t)
    m = json.loads((path / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == "tables/P3.parquet":
            f["sha256"], f["bytes"], f["rows"] = sha256_file(t), t.stat().st_size, pl.read_parquet(t).height
    (path / "manifest.json").write_text(json.dumps(m))
    fails = verify_release(path)
    assert any(f.check == "table_layout" and f.table == "P3" and f.geolevel == "block" for f in fails)


def test_privacy_section_must_follow_from_the_strategy_files(tmp_path) -> None:
    """A privacy section edited before writing (here: a smaller ε) is refused; nothing is published."""
    c = make_case(8, n_blocks=20)
    bad = privacy_parameters({"persons": load_strategy("census2020_pl94"), "units": load_strategy("census2020_units")})
    bad["epsilon"]["cks2020"] = "1/10"
    with pytest.raises(ReleaseError, match="does not follow from the strategy files"):
        write_release(tmp_path, meta("rel-eps"), c.geography, c.persons, c.units, c.invariants, bad)
    assert list(tmp_path.iterdir()) == []


def test_release_carries_its_strategies_and_settings(built) -> None:
    path = built[1]
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "dptab-release/3" and m["randomness"] == "seeded" and m["seed"] == 7
    assert m["contents"] == {"csv": True, "measurements": True, "unbiased": False}
    assert m["estimator"]["name"] == "topdown"
    for kind, name in (("persons", "census2020_pl94"), ("units", "census2020_units")):
        assert m["privacy"]["runs"][kind]["strategy_file"] == f"privacy/{kind}.yaml"
        assert (path / "privacy" / f"{kind}.yaml").read_bytes() == load_strategy(name).source.read_bytes()


@pytest.mark.parametrize("seed, randomness", [(7, "keyed"), (None, "seeded"), (7, "sometimes")])
def test_seed_and_randomness_must_agree(tmp_path, seed, randomness) -> None:
    c = make_case(8, n_blocks=20)
    m = ReleaseMetadata("rel-seed", "synthetic-test", "0.1.0", "ab" * 32, seed=seed, randomness=randomness)
    with pytest.raises(ReleaseError, match="randomness"):
        write_release(tmp_path, m, c.geography, c.persons, c.units, c.invariants, PRIVACY)
    assert list(tmp_path.iterdir()) == []
