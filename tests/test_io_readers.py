"""Readers (both persons layouts, real PPMF records), atomic writes and file hashes."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_cases import persons_df, to_ppmf, units_df, write  # noqa: E402

from pipeline.files import copy_file_sha256, repeated_text, sha256_file, write_parquet_atomic
from pipeline.inputs.problems import InputValidationError
from pipeline.inputs.readers import read_persons, read_units
from pipeline.inputs.validation import validate_inputs

PERRY_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ppmf_20210428_eps12-2_P_01105_perry_al.csv"
PERSONS_OUT = {"geoid": pl.String, "hhgq": pl.Int32, "voting_age": pl.Int32, "hispanic": pl.Int32, "cenrace": pl.Int32}


def test_read_persons_our_layout(tmp_path: Path) -> None:
    lf = read_persons(write(persons_df(), tmp_path / "p.parquet"))
    assert isinstance(lf, pl.LazyFrame)
    df = lf.collect()
    assert df.schema == PERSONS_OUT
    assert df["geoid"].to_list() == persons_df()["geoid"].to_list()
    assert df["cenrace"].to_list() == persons_df()["cenrace"].cast(pl.Int32).to_list()


@pytest.mark.parametrize("integers", [False, True])
def test_read_persons_ppmf_layout_equals_ours(tmp_path: Path, integers: bool) -> None:
    ppmf = to_ppmf(persons_df(), integers=integers)
    if integers:
        assert ppmf["TABBLKST"].dtype == pl.Int64 and ppmf["TABBLKST"][0] == 1  # "01" lost its zero
    got = read_persons(write(ppmf, tmp_path / "p.parquet")).collect()
    want = read_persons(write(persons_df(), tmp_path / "q.parquet")).collect()
    assert got.equals(want)


def test_read_units(tmp_path: Path) -> None:
    df = read_units(write(units_df(), tmp_path / "u.parquet")).collect()
    assert df.schema == {"unit_id": pl.String, "geoid": pl.String, "kind": pl.Int32, "occupied": pl.Boolean}
    assert df["occupied"].null_count() == 2  # the two GQ facilities
    assert df.filter(pl.col("kind") > 0)["occupied"].is_null().all()


def test_read_units_integer_ids_and_flags(tmp_path: Path) -> None:
    u = units_df().with_columns(pl.int_range(100, 109).alias("unit_id"), pl.col("occupied").cast(pl.UInt8))
    df = read_units(write(u, tmp_path / "u.parquet")).collect()
    assert df["unit_id"].to_list() == [str(i) for i in range(100, 109)]
    assert df["occupied"].to_list() == units_df()["occupied"].to_list()


def test_readers_refuse_schema_problems(tmp_path: Path) -> None:
    with pytest.raises(InputValidationError, match="missing_column"):
        read_persons(write(persons_df().drop("hispanic"), tmp_path / "p.parquet"))
    with pytest.raises(InputValidationError, match="missing_path"):
        read_units(tmp_path / "absent.parquet")


@pytest.fixture(scope="module")
def perry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not PERRY_CSV.exists():
        pytest.skip(f"real PPMF sample not found at {PERRY_CSV}")
    d = tmp_path_factory.mktemp("perry")
    # inferred types: the CSV reader turns "01"/"105"/"01" into integers, exercising zero-padding
    return write(pl.read_csv(PERRY_CSV), d / "perry.parquet")


def test_real_ppmf_perry_county(perry: Path, tmp_path: Path) -> None:
    raw = pl.read_parquet(perry)
    assert raw["TABBLKST"].dtype.is_integer()
    df = read_persons(perry).collect()
    assert df.height == raw.height == 10588
    assert df["geoid"].str.len_chars().eq(15).all() and df["geoid"].str.starts_with("01105").all()
    assert df["geoid"].str.contains(r"^[0-9]{15}$").all()
    # block group digit = first digit of the block code
    assert (df["geoid"].str.slice(11, 1) == raw["TABBLKGRPCE"].cast(pl.String)).all()
    assert int(df["voting_age"].sum()) == int((raw["VOTING_AGE"] == 2).sum())
    assert int(df["hispanic"].sum()) == int((raw["CENHISP"] == 2).sum())
    assert df["cenrace"].to_list() == raw["CENRACE"].cast(pl.Int32).to_list()
    assert set(df["hhgq"].unique()) <= set(range(8))
    # with a units file built to match, the whole real file validates
    blocks = df.group_by("geoid").agg(
        (pl.col("hhgq") == 0).sum().alias("hh"), *[(pl.col("hhgq") == k).sum().alias(f"g{k}") for k in range(1, 8)])
    rows = []
    for r in blocks.iter_rows(named=True):
        rows += [(f"{r['geoid']}h{i}", r["geoid"], 0, i < r["hh"]) for i in range(max(r["hh"] // 2, 1))]
        rows += [(f"{r['geoid']}g{k}", r["geoid"], k, None) for k in range(1, 8) if r[f"g{k}"]]
    u = write(units_df(rows), tmp_path / "units.parquet")
    v = validate_inputs(perry, u)
    assert v.summary.persons_rows == 10588 and v.summary.persons_layout == "ppmf"
    assert v.summary.person_blocks == blocks.height
    assert v.summary.gq_persons == int((raw["GQTYPE_PL"] > 0).sum())


# --------------------------------------------------------------------------------------
# writing


def test_write_parquet_atomic_round_trip(tmp_path: Path) -> None:
    df = persons_df()
    out = write_parquet_atomic(df, tmp_path / "sub" / "x.parquet")
    assert pl.read_parquet(out).equals(df)
    table = pa.table({"a": [1, 2, 3]})
    write_parquet_atomic(table, out)  # overwrite allowed by default
    assert pl.read_parquet(out)["a"].to_list() == [1, 2, 3]
    assert [p.name for p in out.parent.iterdir()] == ["x.parquet"]  # no temp files left


def test_write_parquet_atomic_refuses_overwrite(tmp_path: Path) -> None:
    out = write_parquet_atomic(persons_df(), tmp_path / "x.parquet")
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        write_parquet_atomic(units_df(), out, overwrite=False)
    assert out.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1
    write_parquet_atomic(units_df(), tmp_path / "y.parquet", overwrite=False)
    assert pl.read_parquet(tmp_path / "y.parquet").equals(units_df())


def test_write_parquet_atomic_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.files as io

    out = write_parquet_atomic(persons_df(), tmp_path / "x.parquet")
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(units_df(), out)
    assert out.read_bytes() == before  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]


def test_write_parquet_atomic_rejects_other_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_parquet_atomic({"a": [1]}, tmp_path / "x.parquet")  # type: ignore[arg-type]
    assert not (tmp_path / "x.parquet").exists()


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    f = tmp_path / "blob"
    f.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(f) == want
    assert sha256_file(f, chunk_bytes=1000) == want  # chunk boundaries do not matter
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_copy_file_sha256_copies_and_hashes_in_one_read(tmp_path: Path) -> None:
    data = os.urandom(5 * 1000 + 3)
    (tmp_path / "src").write_bytes(data)
    for chunk in (1000, 1 << 20):  # chunk boundaries inside and beyond the file
        dst = tmp_path / f"dst-{chunk}"
        assert copy_file_sha256(tmp_path / "src", dst, chunk_bytes=chunk) == hashlib.sha256(data).hexdigest()
        assert dst.read_bytes() == data
    (tmp_path / "empty").write_bytes(b"")
    assert copy_file_sha256(tmp_path / "empty", tmp_path / "e2") == hashlib.sha256(b"").hexdigest()
    assert (tmp_path / "e2").read_bytes() == b""


@pytest.mark.parametrize("n", [0, 1, 5, (1 << 22) + 3])
def test_repeated_text_is_a_valid_one_entry_dictionary(n: int) -> None:
    """Made without Arrow's per-index check (every index is 0, the one entry): still a valid
    array of ``n`` equal texts, for counts below and beyond the kept zeros."""
    a = repeated_text("P1", n, index_type=np.int8)
    a.validate(full=True)
    assert len(a) == n and a.dictionary.to_pylist() == ["P1"]
    assert a.to_pylist() == ["P1"] * n if n < 10 else not a.indices.to_numpy().any()


def test_arrow_dictionary_large_string_and_unsigned_columns(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    p = persons_df()
    table = pa.table({
        "geoid": pa.array(p["geoid"].to_list()).dictionary_encode(),
        "hhgq": pa.array(p["hhgq"].to_list(), pa.uint8()),
        "voting_age": pa.array(p["voting_age"].to_list(), pa.uint16()),
        "hispanic": pa.array(p["hispanic"].to_list(), pa.int64()),
        "cenrace": pa.array([f"{c:02d}" for c in p["cenrace"]], pa.large_string()),
    })
    pq.write_table(table, tmp_path / "p.parquet")
    u = units_df()
    pq.write_table(pa.table({"unit_id": pa.array(u["unit_id"].to_list(), pa.large_string()),
                             "geoid": pa.array(u["geoid"].to_list()).dictionary_encode(),
                             "kind": pa.array(u["kind"].to_list(), pa.uint32()),
                             "occupied": pa.array(u["occupied"].to_list(), pa.bool_())}), tmp_path / "u.parquet")
    v = validate_inputs(tmp_path / "p.parquet", tmp_path / "u.parquet")
    assert v.persons.collect().equals(read_persons(write(p, tmp_path / "q.parquet")).collect())
    assert v.units.collect()["kind"].to_list() == u["kind"].to_list()


def test_group_quarters_only_units_with_all_null_occupied(tmp_path: Path) -> None:
    # a units file holding only facilities has an all-null `occupied` column (Null dtype)
    p = persons_df([("010010201001000", 5, 1, 0, 1), ("010010201001000", 5, 0, 1, 2)])
    u = pl.DataFrame({"unit_id": ["f1"], "geoid": ["010010201001000"], "kind": [5], "occupied": [None]})
    assert u.schema["occupied"] == pl.Null
    v = validate_inputs(write(p, tmp_path / "p.parquet"), write(u, tmp_path / "u.parquet"))
    assert v.summary.gq_persons == 2 and v.summary.housing_units == 0
    assert v.units.collect()["occupied"].dtype == pl.Boolean


def test_contract_geoid_widths_are_checked(tmp_path: Path) -> None:
    from pipeline.inputs.contract import CONTRACT_PATH, load_contract

    c = load_contract()
    assert c["geoid_width"] == 15
    bad = CONTRACT_PATH.read_text().replace("TABTRACTCE: {type: digits, width: 6", "TABTRACTCE: {type: digits, width: 5")
    (tmp_path / "c.yaml").write_text(bad)
    with pytest.raises(ValueError, match="geoid_width"):
        load_contract(tmp_path / "c.yaml")
