"""The committed sample inputs in data/ read through the real readers and match data/README.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.inputs.histograms import build_person_histograms, build_unit_counts
from pipeline.inputs.readers import read_persons, read_units
from pipeline.inputs.synth import units_from_persons
from pipeline.inputs.validation import validate_inputs
from pipeline.model.geography import Geography
from pipeline.model.spec import load_spec

DATA = Path(__file__).resolve().parent.parent / "data"
SPEC = load_spec("pl94")


def _hists(persons: Path, units: Path):
    u = read_units(units)
    geo = Geography.from_block_geoids(u.select("geoid").unique().collect()["geoid"])
    return geo, build_person_histograms(read_persons(persons), geo, SPEC), build_unit_counts(u, geo)


def test_perry_county_ppmf_records():
    persons, units = DATA / "perry_al_ppmf_persons.parquet", DATA / "perry_al_units.parquet"
    validate_inputs(persons, units, SPEC)
    raw = pl.read_parquet(persons)
    assert raw.columns == ["VINTAGE", "TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLKGRPCE", "TABBLK",
                           "RTYPE", "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE"]
    assert raw["TABBLKST"].unique().to_list() == ["01"] and raw["TABBLKCOU"].unique().to_list() == ["105"]
    geo, hists, counts = _hists(persons, units)
    assert [lv.n_units for lv in geo.levels] == [1, 1, 1, 3, 12, 511]
    assert geo.level("county").geoids.tolist() == ["01105"]
    assert hists["county"].total() == 10_588
    # the normalised codes agree with the raw PPMF codes
    hhgq = hists["county"].dense()[0].reshape(8, 2, 2, 63).sum(axis=(1, 2, 3))
    raw_gq = raw.group_by("GQTYPE_PL").len().sort("GQTYPE_PL")
    assert {int(k): int(v) for k, v in raw_gq.iter_rows()} == {i: int(x) for i, x in enumerate(hhgq) if x}
    va = hists["county"].dense()[0].reshape(8, 2, 2, 63).sum(axis=(0, 2, 3))
    assert va[1] == (raw["VOTING_AGE"] == 2).sum()
    c = counts["county"]
    assert (c.housing_units[0], c.occupied[0]) == (4_719, 4_176)
    assert c.facilities[0].tolist() == [1, 0, 2, 0, 4, 0, 0]


def test_perry_units_follow_the_documented_rule():
    persons = read_persons(DATA / "perry_al_ppmf_persons.parquet")
    committed = pl.read_parquet(DATA / "perry_al_units.parquet")
    assert units_from_persons(persons).equals(committed)
    hh = persons.filter(pl.col("hhgq") == 0).group_by("geoid").len("hh").collect()
    occ = committed.filter(pl.col("kind") == 0).group_by("geoid").agg(pl.col("occupied").sum(), pl.len().alias("hu"))
    j = hh.join(occ, on="geoid").sort("geoid")
    assert j.height == hh.height
    np.testing.assert_array_equal(j["occupied"].to_numpy(), np.ceil(j["hh"].to_numpy() / 2.5))
    assert 0.10 < 1 - j["occupied"].sum() / j["hu"].sum() < 0.14


def test_synthetic_sample():
    persons, units = DATA / "synth_ri" / "persons.parquet", DATA / "synth_ri" / "units.parquet"
    validate_inputs(persons, units, SPEC)
    geo, hists, counts = _hists(persons, units)
    assert geo.level("state").geoids.tolist() == ["44"]
    assert all(h.total() == 75_000 for h in hists.values())
    assert (counts["state"].housing_units[0], counts["state"].occupied[0]) == (32_387, 28_963)
    assert int(counts["state"].facilities.sum()) == 29
    gq = hists["state"].dense()[0].reshape(8, -1).sum(axis=1)
    assert int(gq[1:].sum()) == 1_922


def test_synthetic_sample_is_reproduced_by_the_recorded_command(tmp_path):
    from typer.testing import CliRunner

    from dptab.cli import app

    r = CliRunner().invoke(app, ["synth", "--persons", "75000", "--seed", "2020", "--state", "44",
                                 "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("persons.parquet", "units.parquet"):
        assert pl.read_parquet(tmp_path / name).equals(pl.read_parquet(DATA / "synth_ri" / name)), name
