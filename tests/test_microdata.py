"""Protected microdata in the PPMF layout (pipeline.microdata)."""

from __future__ import annotations

import csv

import numpy as np
import polars as pl
import pytest
from shared_data import shared_file
from test_tables_cases import make_case

from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import load_spec
from pipeline.release.microdata import (
    PPMF_COLUMNS,
    MicrodataError,
    histogram_from_microdata,
    microdata_from_blocks,
)

SPEC = load_spec("pl94")
#: the Census Bureau's Perry County, AL PPMF, in ../shared beside the repository (tests/shared_data.py)
PERRY = "data/real/ppmf_20210428_eps12-2_P_01105_perry_al.csv"


def test_round_trip_gives_the_block_histogram() -> None:
    c = make_case(4, n_blocks=80)
    blocks = c.geography.level("block")
    h = c.persons["block"]
    df = microdata_from_blocks(blocks.geoids, h, SPEC)
    assert tuple(df.columns) == PPMF_COLUMNS
    assert df.height == int(h.count.sum())
    unit, cell, count = histogram_from_microdata(df, blocks.geoids, SPEC)
    assert np.array_equal(unit, h.unit) and np.array_equal(cell, h.cell) and np.array_equal(count, h.count)


def test_layout_codes_and_order() -> None:
    geoids = np.array(["011056868001000", "011056868001001", "440070001012003"])
    x = np.zeros((3, SPEC.n_cells), dtype=np.int64)
    # block 0: 2 household adults, Hispanic, White; block 2: 1 nursing-home adult, Black; block 1 empty
    x[0, SPEC.cell_index(hhgq=[0], voting_age=[1], hispanic=[1], cenrace=[1])[0]] = 2
    x[2, SPEC.cell_index(hhgq=[3], voting_age=[1], hispanic=[0], cenrace=[2])[0]] = 1
    df = microdata_from_blocks(geoids, SparseHistogram.from_dense("block", x), SPEC)
    assert df.rows() == [
        ("01", "105", "686800", "1", "1000", 1, "3", 0, 2, 2, "01"),
        ("01", "105", "686800", "1", "1000", 2, "3", 0, 2, 2, "01"),
        ("44", "007", "000101", "2", "2003", 3, "5", 3, 2, 1, "02"),
    ]


def test_sorted_by_geography_then_epnum() -> None:
    c = make_case(5)
    df = microdata_from_blocks(c.geography.level("block").geoids, c.persons["block"], SPEC)
    key = df.select(pl.concat_str(["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK"]))
    assert key.to_series().is_sorted()
    assert df["EPNUM"].to_list() == list(range(1, df.height + 1))


def test_bad_inputs_are_refused() -> None:
    x = np.zeros((2, SPEC.n_cells), dtype=np.int64)
    with pytest.raises(MicrodataError, match="2 blocks"):
        microdata_from_blocks(np.array(["011056868001000"]), x, SPEC)
    with pytest.raises(MicrodataError, match="15 digits"):
        microdata_from_blocks(np.array(["0110568680010", "0110568680011"]), x, SPEC)


def test_reproduces_census_ppmf_records() -> None:
    """Re-expanding the tabulated Perry County PPMF gives the same records (up to EPNUM order)."""
    perry = shared_file(PERRY)  # skips locally, fails in CI when missing
    with open(perry, newline="") as fh:
        rows = list(csv.DictReader(fh))
    src = pl.DataFrame(rows).drop("VINTAGE").with_columns(
        pl.col("GQTYPE_PL", "VOTING_AGE", "CENHISP").cast(pl.Int64))
    geoids = np.unique(src.select(pl.concat_str(["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLK"])).to_series().to_numpy())
    unit, cell, count = histogram_from_microdata(src, geoids, SPEC)
    h = SparseHistogram("block", len(geoids), SPEC.n_cells, unit, cell, count)
    out = microdata_from_blocks(geoids, h, SPEC)
    cols = [c for c in PPMF_COLUMNS if c != "EPNUM"]
    a = src.select(cols).with_columns(pl.col("RTYPE").cast(pl.Utf8)).sort(cols)
    b = out.select(cols).sort(cols)
    assert a.height == 10_588 and a.equals(b)


def test_our_ppmf_reader_reads_the_microdata(tmp_path) -> None:
    """The project's PPMF input reader (pipeline.io) reads the file back to the same histogram."""
    from pipeline.inputs.histograms import build_block_histogram
    from pipeline.inputs.readers import read_persons

    c = make_case(6)
    blocks = c.geography.level("block")
    df = microdata_from_blocks(blocks.geoids, c.persons["block"], SPEC)
    df.write_parquet(tmp_path / "ppmf.parquet")
    h = build_block_histogram(read_persons(tmp_path / "ppmf.parquet"), c.geography, SPEC)
    assert h.equals(c.persons["block"])
