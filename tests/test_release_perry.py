"""A release from real records: the Census Bureau's Perry County, AL PPMF (10,588 persons, 511 blocks).

The PPMF rows are already privacy-protected, so they stand in for published block histograms;
upper levels are their sums. No units file exists for them, so the release has no H1.
"""

from __future__ import annotations

import json

import polars as pl
from shared_data import shared_file

from pipeline.inputs.histograms import build_person_histograms
from pipeline.inputs.readers import read_persons
from pipeline.model.geography import Geography
from pipeline.model.spec import load_spec
from pipeline.model.strategy import load_strategy
from pipeline.release.checks import Invariants
from pipeline.release.manifest import ReleaseMetadata, privacy_parameters
from pipeline.release.verify import verify_release
from pipeline.release.writer import write_release

#: the Census Bureau's Perry County, AL PPMF, in ../shared beside the repository (tests/shared_data.py)
PERRY = "data/real/ppmf_20210428_eps12-2_P_01105_perry_al.csv"


def test_release_from_perry_county_ppmf(tmp_path) -> None:
    perry = shared_file(PERRY)  # skips locally, fails in CI when missing
    src = pl.read_csv(perry, infer_schema=False)
    src.write_parquet(tmp_path / "perry.parquet")
    persons = read_persons(tmp_path / "perry.parquet")
    blocks = persons.select("geoid").unique().collect()["geoid"]
    geo = Geography.from_block_geoids(blocks)
    spec = load_spec("pl94")
    hists = build_person_histograms(persons, geo, spec)
    inv = Invariants({"01": hists["state"].total()})
    privacy = privacy_parameters({"persons": load_strategy("census2020_pl94")})
    meta = ReleaseMetadata("perry-test", "perry-ppmf", "0.1.0", "cd" * 32)
    path = write_release(tmp_path / "releases", meta, geo, hists, None, inv, privacy)
    assert verify_release(path) == []
    m = json.loads((path / "manifest.json").read_text())
    assert m["persons"] == 10_588 and {t["name"] for t in m["tables"]} == {"P1", "P2", "P3", "P4", "P5"}
    p1 = pl.read_parquet(path / "tables" / "P1.parquet")
    county = p1.filter((pl.col("geolevel") == "county") & (pl.col("line") == 1))
    assert county["name"].to_list() == ["Perry County, Alabama"] and county["count"].to_list() == [10_588]
    tracts = p1.filter((pl.col("geolevel") == "tract") & (pl.col("line") == 1))["name"].to_list()
    assert tracts == ["Census Tract 6868", "Census Tract 6870", "Census Tract 6871"]
    assert not (path / "tables" / "H1.parquet").exists()
    # the published microdata are the PPMF records again (up to EPNUM)
    cols = ["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLKGRPCE", "TABBLK", "GQTYPE_PL", "VOTING_AGE", "CENHISP", "CENRACE"]
    out = pl.read_parquet(path / "microdata" / "persons.parquet").select(cols).cast({c: pl.Utf8 for c in cols}).sort(cols)
    assert out.equals(src.select(cols).sort(cols))
