"""The RI 2010 evaluation set reproduces the published block counts exactly."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.model.config import load_config
from pipeline.review.evaldata import (
    DEFAULT_SOURCE,
    GROUP_CENRACE,
    EvalDataError,
    read_ri2010,
    ri2010_persons,
    ri2010_units,
    write_ri2010,
)

needs_source = pytest.mark.skipif(not DEFAULT_SOURCE.is_file(), reason=f"{DEFAULT_SOURCE} not present")


def _block_margins(persons: pl.DataFrame) -> pl.DataFrame:
    """pop, vap and each group's pop/vap per block, recomputed from person records."""
    hisp = pl.col("hispanic") == 1
    groups = {"hisp": hisp}
    for g, code in GROUP_CENRACE.items():
        groups[g] = ~hisp & (pl.col("cenrace") == code)
    groups["two"] = ~hisp & (pl.col("cenrace") >= 7)
    va = pl.col("voting_age") == 1
    aggs = [pl.len().alias("pop"), va.sum().alias("vap")]
    for g, e in groups.items():
        aggs += [e.sum().alias(f"pop_{g}"), (e & va).sum().alias(f"vap_{g}")]
    return persons.group_by("geoid").agg(aggs)


@needs_source
def test_ri2010_reproduces_every_published_block_count(tmp_path):
    src = read_ri2010()
    assert src.height == 25_181 and src["pop"].sum() == 1_052_567
    paths = write_ri2010(tmp_path)
    persons = pl.read_parquet(paths["persons"])
    got = _block_margins(persons)
    want = src.filter(pl.col("pop") > 0)
    cols = [c for c in want.columns if c != "geoid"]
    joined = want.join(got, on="geoid", how="full", suffix="_got", coalesce=True)
    assert joined.height == want.height  # no extra or missing populated block
    for c in cols:
        assert (joined[c] == joined[f"{c}_got"]).all(), c
    assert set(persons["hhgq"].unique()) == {0}
    assert "CC BY-SA 4.0" in paths["readme"].read_text()
    cfg = load_config(paths["config"])  # a valid run config pointing at the written files
    assert cfg.inputs.persons == paths["persons"].resolve() and cfg.privacy.strategy == "census2020_pl94"


@needs_source
def test_ri2010_units_cover_every_block_and_fit_the_population(tmp_path):
    src = read_ri2010()
    units = ri2010_units(src)
    assert units["unit_id"].n_unique() == units.height
    per = units.group_by("geoid").agg(pl.len().alias("hu"), pl.col("occupied").sum().alias("occ"))
    j = src.select("geoid", "pop").join(per, on="geoid", how="left")
    assert j["hu"].null_count() == 0                      # all 25,181 blocks have a unit
    assert (j["occ"] <= j["pop"]).all()                   # household population >= occupied units
    assert ((j["pop"] > 0) == (j["occ"] > 0)).all()       # persons exactly where occupied units are


def test_conversion_is_seeded_and_exact_on_a_small_file(tmp_path):
    row = {"GEOID": "440010301001000", "state": 44, "county": 1, "vtd": "NA", "pop": 30, "vap": 20}
    for a, vals in (("pop", (6, 10, 2, 1, 3, 0, 1, 7)), ("vap", (4, 8, 1, 1, 2, 0, 0, 4))):
        for g, v in zip(("hisp", "white", "black", "aian", "asian", "nhpi", "other", "two"), vals):
            row[f"{a}_{g}"] = v
    f = tmp_path / "one.csv"
    pl.DataFrame([row]).write_csv(f)
    df = read_ri2010(f)
    a, b = ri2010_persons(df, seed=5), ri2010_persons(df, seed=5)
    assert a.equals(b) and a.height == 30 and int(a["voting_age"].sum()) == 20
    nh_two = a.filter((pl.col("hispanic") == 0) & (pl.col("cenrace") >= 7))
    assert nh_two.height == 7 and int(nh_two["voting_age"].sum()) == 4
    bad = dict(row, pop_white=11)
    pl.DataFrame([bad]).write_csv(f)
    with pytest.raises(EvalDataError, match="pop != sum of pop groups"):
        read_ri2010(f)
    with pytest.raises(EvalDataError, match="not found"):
        read_ri2010(tmp_path / "missing.csv")
    assert np.isclose(float(ri2010_units(df)["occupied"].sum()), 12)  # round(30 / 2.44)
