"""Total input validation: every kind of bad input is reported with its file, column and kind.

Each case builds a valid persons/units pair (tests/io_cases.py), breaks it in one way (or
several), and asserts that :func:`validate_inputs` raises one :class:`InputValidationError`
whose message names the file, the column and the kind of every expected problem.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_cases import B1, B2, B3, B4, persons_df, to_ppmf, units_df, write  # noqa: E402

from pipeline.inputs.problems import InputValidationError, Problem
from pipeline.inputs.validation import validate_inputs  # noqa: E402

Expect = tuple[str, str, str]  # (file role "persons"/"units" or a path, column, kind)


def _paths(tmp: Path, persons: pl.DataFrame | None = None, units: pl.DataFrame | None = None) -> tuple[Path, Path]:
    p = write(persons if persons is not None else persons_df(), tmp / "persons.parquet")
    u = write(units if units is not None else units_df(), tmp / "units.parquet")
    return p, u


def _set(df: pl.DataFrame, row: int, **values) -> pl.DataFrame:
    """Copy of ``df`` with the given columns changed in one row (dtype may change)."""
    idx = pl.int_range(pl.len()) == row
    return df.with_columns(pl.when(idx).then(pl.lit(v)).otherwise(pl.col(c)).alias(c) for c, v in values.items())


def _assert_problems(err: InputValidationError, expected: list[tuple[str, str, str]]) -> None:
    text = str(err)
    lines = text.splitlines()
    for file, column, kind in expected:
        hits = [p for p in err.problems if p.file == file and p.column == column and p.kind == kind]
        assert hits, f"no problem ({file}, {column}, {kind}) in:\n{text}"
        # the one message has a line naming file, column and kind together
        assert any(file in ln and f"column '{column}'" in ln and kind in ln for ln in lines) or (
            column == "" and any(file in ln and kind in ln for ln in lines)), text
        assert all(h.count >= 1 for h in hits)


def _resolve(expected: list[Expect], p: Path, u: Path) -> list[tuple[str, str, str]]:
    role = {"persons": str(p), "units": str(u)}
    return [(role.get(f, f), c, k) for f, c, k in expected]


# --------------------------------------------------------------------------------------
# cases: tmp -> (persons path, units path, expected problems)

Case = Callable[[Path], tuple[Path, Path, list[Expect]]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@case
def wrong_type_float_attribute(t):
    return *_paths(t, persons_df().with_columns(pl.col("hhgq").cast(pl.Float64))), [("persons", "hhgq", "wrong_type")]


@case
def wrong_type_integer_geoid(t):
    p = persons_df().with_columns(pl.col("geoid").cast(pl.Int64))
    return *_paths(t, p), [("persons", "geoid", "wrong_type")]


@case
def null_attribute(t):
    return *_paths(t, _set(persons_df(), 3, voting_age=None)), [("persons", "voting_age", "null")]


@case
def null_geoid(t):
    return *_paths(t, _set(persons_df(), 0, geoid=None)), [("persons", "geoid", "null")]


@case
def hhgq_out_of_domain(t):
    return *_paths(t, _set(persons_df(), 2, hhgq=8)), [("persons", "hhgq", "out_of_domain")]


@case
def voting_age_out_of_domain(t):
    return *_paths(t, _set(persons_df(), 2, voting_age=2)), [("persons", "voting_age", "out_of_domain")]


@case
def hispanic_out_of_domain(t):
    return *_paths(t, _set(persons_df(), 2, hispanic=-1)), [("persons", "hispanic", "out_of_domain")]


@case
def cenrace_out_of_domain(t):
    p = _set(_set(persons_df(), 1, cenrace=0), 4, cenrace=64)
    return *_paths(t, p), [("persons", "cenrace", "out_of_domain")]


@case
def cenrace_text_not_integer(t):
    p = persons_df().with_columns(pl.col("cenrace").cast(pl.String))
    return *_paths(t, _set(p, 5, cenrace="two")), [("persons", "cenrace", "non_integer")]


@case
def geoid_wrong_length(t):
    return *_paths(t, _set(persons_df(), 0, geoid=B1[:-1])), [("persons", "geoid", "wrong_length")]


@case
def geoid_non_digits(t):
    return *_paths(t, _set(persons_df(), 0, geoid=B1[:-1] + "A")), [("persons", "geoid", "non_digit")]


@case
def geoid_sign_space_and_unicode_digits(t):
    p = _set(_set(_set(persons_df(), 0, geoid="+" + B1[1:]), 3, geoid=B1[:-1] + " "), 6, geoid=B1[:-1] + "\u0661")
    return *_paths(t, p), [("persons", "geoid", "non_digit")]


@case
def ppmf_component_wrong_width(t):
    p = _set(to_ppmf(persons_df()), 0, TABTRACTCE="20100")
    return *_paths(t, p), [("persons", "TABTRACTCE", "wrong_length")]


@case
def ppmf_component_non_digits(t):
    p = _set(to_ppmf(persons_df()), 1, TABBLK="10a0")
    return *_paths(t, p), [("persons", "TABBLK", "non_digit")]


@case
def ppmf_integer_component_too_wide(t):
    p = _set(to_ppmf(persons_df(), integers=True), 0, TABBLKCOU=1234)
    return *_paths(t, p), [("persons", "TABBLKCOU", "wrong_length")]


@case
def ppmf_integer_component_negative(t):
    p = _set(to_ppmf(persons_df(), integers=True), 0, TABBLKST=-1)
    return *_paths(t, p), [("persons", "TABBLKST", "non_digit")]


@case
def ppmf_block_group_not_prefix_of_block(t):
    p = _set(to_ppmf(persons_df()), 0, TABBLKGRPCE="2")
    return *_paths(t, p), [("persons", "TABBLKGRPCE", "prefix_mismatch")]


@case
def ppmf_codes_out_of_domain(t):
    p = _set(_set(to_ppmf(persons_df()), 0, VOTING_AGE=0), 1, CENHISP=3)
    p = _set(p, 2, CENRACE="x1")
    return *_paths(t, p), [("persons", "VOTING_AGE", "out_of_domain"), ("persons", "CENHISP", "out_of_domain"),
                           ("persons", "CENRACE", "non_integer")]


@case
def gq_person_without_facility(t):
    # a college-housing (type 5) person in B3, which has no type-5 facility
    p = _set(persons_df(), 12, hhgq=5)
    return *_paths(t, p), [("persons", "hhgq", "gq_without_facility")]


@case
def household_person_without_housing_unit(t):
    u = units_df().filter(~((pl.col("geoid") == B2) & (pl.col("kind") == 0)))
    return *_paths(t, None, u), [("persons", "hhgq", "household_without_housing_unit")]


@case
def household_person_where_all_units_vacant(t):
    u = units_df().with_columns(pl.when(pl.col("geoid") == B3).then(False).otherwise(pl.col("occupied")).alias("occupied"))
    return *_paths(t, None, u), [("persons", "hhgq", "household_without_occupied_unit")]


@case
def under_18_in_nursing_facility(t):
    return *_paths(t, _set(persons_df(), 10, voting_age=0)), [("persons", "hhgq+voting_age", "structural_zero")]


@case
def ppmf_under_18_in_nursing_facility(t):
    p = _set(to_ppmf(persons_df()), 10, VOTING_AGE=1)  # PPMF 1 = under 18
    return *_paths(t, p), [("persons", "GQTYPE_PL+VOTING_AGE", "structural_zero")]


@case
def units_directory_with_bad_part(t):
    d = t / "units"
    write(units_df().head(5), d / "part-0.parquet")
    (d / "part-1.parquet").write_bytes(b"PAR1 garbage")
    return write(persons_df(), t / "persons.parquet"), d, [(str(d / "part-1.parquet"), "", "truncated_parquet")]


@case
def files_swapped(t):
    p, u = _paths(t)
    # roles follow the arguments: the units file is read as persons and vice versa
    return u, p, [("persons", "hhgq", "missing_column"), ("persons", "cenrace", "missing_column"),
                  ("units", "unit_id", "missing_column"), ("units", "kind", "missing_column")]


@case
def directory_whose_parts_are_directories(t):
    p, u = _paths(t)
    p.unlink()
    p.mkdir()  # a directory named like the file, holding a directory named like a part
    (p / "part-0.parquet").mkdir()
    return p, u, [("persons", "", "empty_directory")]


@case
def duplicate_unit_ids(t):
    return *_paths(t, None, _set(units_df(), 4, unit_id="u2")), [("units", "unit_id", "duplicate_id")]


@case
def null_unit_id(t):
    return *_paths(t, None, _set(units_df(), 8, unit_id=None)), [("units", "unit_id", "null")]


@case
def unit_kind_out_of_domain(t):
    return *_paths(t, None, _set(units_df(), 8, kind=9)), [("units", "kind", "out_of_domain")]


@case
def occupied_null_for_housing_unit(t):
    return *_paths(t, None, _set(units_df(), 2, occupied=None)), [("units", "occupied", "occupied_missing")]


@case
def occupied_set_for_facility(t):
    return *_paths(t, None, _set(units_df(), 3, occupied=True)), [("units", "occupied", "occupied_for_gq")]


@case
def occupied_integer_out_of_domain(t):
    u = units_df().with_columns(pl.col("occupied").cast(pl.Int8))
    return *_paths(t, None, _set(u, 0, occupied=2)), [("units", "occupied", "out_of_domain")]


@case
def units_geoid_wrong_length(t):
    return *_paths(t, None, _set(units_df(), 8, geoid=B4 + "0")), [("units", "geoid", "wrong_length")]


@case
def facility_without_persons(t):
    u = pl.concat([units_df(), units_df([("u10", B3, 6, None)])])
    return *_paths(t, None, u), [("units", "kind", "facility_without_persons")]


@case
def occupied_units_exceed_household_persons(t):
    u = pl.concat([units_df(), units_df([(f"x{i}", B3, 0, True) for i in range(3)])])
    return *_paths(t, None, u), [("units", "occupied", "occupied_exceeds_household")]


@case
def persons_block_absent_from_units(t):
    u = units_df().filter(pl.col("geoid") != B3)
    return *_paths(t, None, u), [("persons", "geoid", "block_not_in_units")]


@case
def missing_column(t):
    return *_paths(t, persons_df().drop("cenrace")), [("persons", "cenrace", "missing_column")]


@case
def missing_units_column(t):
    return *_paths(t, None, units_df().drop("occupied")), [("units", "occupied", "missing_column")]


@case
def ambiguous_layout(t):
    p = pl.concat([persons_df(), to_ppmf(persons_df())], how="horizontal")
    return *_paths(t, p), [("persons", "", "ambiguous_layout")]


@case
def no_known_layout(t):
    p = persons_df().rename({c: f"x_{c}" for c in ["geoid", "hhgq", "voting_age", "hispanic", "cenrace"]})
    return *_paths(t, p), [("persons", "", "missing_column")]


@case
def uppercased_columns_read_as_partial_ppmf(t):
    # VOTING_AGE exists in PPMF: the file is taken as PPMF and its absent columns are listed
    p = persons_df().rename({c: c.upper() for c in ["geoid", "hhgq", "voting_age", "hispanic", "cenrace"]})
    return *_paths(t, p), [("persons", "TABBLKST", "missing_column"), ("persons", "GQTYPE_PL", "missing_column")]


@case
def empty_file_zero_rows(t):
    return *_paths(t, persons_df([])), [("persons", "", "empty_file")]


@case
def zero_byte_file(t):
    p, u = _paths(t)
    p.write_bytes(b"")
    return p, u, [("persons", "", "zero_byte_file")]


@case
def truncated_parquet(t):
    p, u = _paths(t)
    u.write_bytes(u.read_bytes()[:-40])
    return p, u, [("units", "", "truncated_parquet")]


@case
def random_bytes(t):
    import random

    p, u = _paths(t)
    p.write_bytes(random.Random(7).randbytes(3000))
    return p, u, [("persons", "", "not_parquet")]


@case
def corrupt_footer(t):
    p, u = _paths(t)
    raw = bytearray(p.read_bytes())
    raw[-60:-8] = b"\xff" * 52  # keep both magics and the footer length, destroy the footer
    p.write_bytes(bytes(raw))
    return p, u, [("persons", "", "corrupt_parquet")]


@case
def corrupt_data_pages_behind_valid_footer(t):
    import pyarrow.parquet as pq

    p, u = _paths(t)
    col = pq.read_metadata(p).row_group(0).column(0)  # the geoid column chunk
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(p.read_bytes())
    for i in range(start + 10, start + col.total_compressed_size - 2):
        raw[i] ^= 0x5A  # footer intact: only reading the rows can find this
    p.write_bytes(bytes(raw))
    return p, u, [("persons", "", "corrupt_parquet")]


@case
def csv_instead_of_parquet(t):
    p, u = _paths(t)
    persons_df().write_csv(p)
    return p, u, [("persons", "", "not_parquet")]


@case
def directory_parts_with_mismatched_schemas(t):
    d = t / "persons"
    write(persons_df().head(8), d / "part-0.parquet")
    write(persons_df().tail(8).with_columns(pl.col("cenrace").cast(pl.Float32)), d / "part-1.parquet")
    u = write(units_df(), t / "units.parquet")
    return d, u, [(str(d / "part-1.parquet"), "cenrace", "schema_mismatch")]


@case
def empty_directory(t):
    d = t / "persons"
    d.mkdir()
    (d / "_SUCCESS").write_text("")
    return d, write(units_df(), t / "units.parquet"), [("persons", "", "empty_directory")]


@case
def non_existent_path(t):
    _, u = _paths(t)
    return t / "nope.parquet", u, [("persons", "", "missing_path")]


@case
def many_problems_in_both_files(t):
    p = _set(_set(_set(persons_df(), 0, hhgq=9), 1, geoid="0100102010010x0"), 2, cenrace=None)
    p = _set(p, 10, voting_age=0)
    u = _set(_set(units_df(), 0, kind=-3), 4, unit_id="u1")
    return *_paths(t, p, u), [
        ("persons", "hhgq", "out_of_domain"), ("persons", "geoid", "non_digit"), ("persons", "cenrace", "null"),
        ("persons", "hhgq+voting_age", "structural_zero"), ("units", "kind", "out_of_domain"),
        ("units", "unit_id", "duplicate_id")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_reported(tmp_path: Path, name: str) -> None:
    p, u, expected = CASES[name](tmp_path)
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, u)
    _assert_problems(info.value, _resolve(expected, p, u))


def test_at_least_twenty_distinct_problem_kinds() -> None:
    # guards the coverage claim of the brief: >= 20 kinds of bad input, >= 20 problem kinds
    assert len(CASES) >= 40


def test_valid_inputs_pass_with_summary(tmp_path: Path) -> None:
    p, u = _paths(tmp_path)
    v = validate_inputs(p, u)
    s = v.summary
    assert (s.persons_rows, s.units_rows, s.blocks, s.person_blocks) == (16, 9, 4, 3)
    assert (s.household_persons, s.gq_persons, s.housing_units, s.occupied_units, s.gq_facilities) == (12, 4, 7, 5, 2)
    assert s.persons_layout == "dptab"
    persons = v.persons.collect()
    assert persons.equals(persons_df().with_columns(pl.col(c).cast(pl.Int32) for c in persons_df().columns[1:]))
    units = v.units.collect()
    assert units.schema == {"unit_id": pl.String, "geoid": pl.String, "kind": pl.Int32, "occupied": pl.Boolean}


def test_ppmf_layout_validates_to_the_same_frames(tmp_path: Path) -> None:
    ours = validate_inputs(*_paths(tmp_path / "a"))
    for integers in (False, True):
        v = validate_inputs(*_paths(tmp_path / f"b{integers}", to_ppmf(persons_df(), integers=integers)))
        assert v.summary.persons_layout == "ppmf"
        assert v.persons.collect().equals(ours.persons.collect())


def test_sign_space_and_unicode_digit_geoids_all_counted(tmp_path: Path) -> None:
    p, u, _ = CASES["geoid_sign_space_and_unicode_digits"](tmp_path)
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, u)
    (prob,) = [q for q in info.value.problems if q.kind == "non_digit"]
    assert prob.count == 3 and prob.first_rows == (0, 3, 6)


def test_problem_reports_count_rows_and_values(tmp_path: Path) -> None:
    p = persons_df()
    for r in (1, 4, 6, 8, 9, 11, 13):
        p = _set(p, r, cenrace=70 + r)
    with pytest.raises(InputValidationError) as info:
        validate_inputs(*_paths(tmp_path, p))
    (prob,) = [q for q in info.value.problems if q.kind == "out_of_domain"]
    assert prob.count == 7
    assert prob.first_rows == (1, 4, 6, 8, 9)  # first five, 0-based
    assert prob.examples == ("71", "74", "76", "78", "79")
    assert "first rows (0-based): 1: 71, 4: 74" in str(info.value)


def test_row_numbers_in_directory_parts_name_the_part(tmp_path: Path) -> None:
    d = tmp_path / "persons"
    write(persons_df().head(10), d / "part-0.parquet")
    write(_set(persons_df().tail(6), 2, hhgq=12), d / "part-1.parquet")
    u = write(units_df(), tmp_path / "units.parquet")
    with pytest.raises(InputValidationError) as info:
        validate_inputs(d, u)
    (prob,) = info.value.problems
    assert prob.first_rows == (12,) and "part-1.parquet:2" in prob.examples[0]


def test_directory_of_parts_reads_as_one_table(tmp_path: Path) -> None:
    d = tmp_path / "persons"
    for i in range(4):
        write(persons_df()[i * 4:(i + 1) * 4], d / f"part-{i}.parquet")
    (d / "_SUCCESS").write_text("")
    v = validate_inputs(d, write(units_df(), tmp_path / "units.parquet"))
    assert v.summary.persons_rows == 16
    assert v.persons.collect()["geoid"].to_list() == persons_df()["geoid"].to_list()


def test_error_kind_of_problem_is_stable_text() -> None:
    e = InputValidationError([Problem("f.parquet", "hhgq", "out_of_domain", 3, "outside 0..7", (0, 2), ("9", "8"))])
    assert str(e) == ("invalid input: 1 problem found\n  - f.parquet, column 'hhgq': out_of_domain — outside 0..7 "
                      "(count 3); first rows (0-based): 0: 9, 2: 8")
    assert e.exit_status == 2


def test_on_step_reports_each_pass(tmp_path: Path) -> None:
    steps: list[str] = []
    validate_inputs(*_paths(tmp_path), on_step=steps.append)
    assert steps == ["persons: checking 16 rows", "units: checking 9 rows", "persons x units: checking blocks"]


def test_unreadable_file_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, u = _paths(tmp_path)
    real_open = open

    def guarded(path, *a, **k):
        if Path(path) == p:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("pipeline.inputs.parquet.open", guarded, raising=False)
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, u)
    _assert_problems(info.value, [(str(p), "", "unreadable_file")])
    assert "Permission denied" in str(info.value)


def test_cross_file_problems_name_offending_rows_and_blocks(tmp_path: Path) -> None:
    p, u, _ = CASES["occupied_units_exceed_household_persons"](tmp_path)
    q, _, _ = CASES["gq_person_without_facility"](tmp_path / "q")
    with pytest.raises(InputValidationError) as info:
        validate_inputs(q, u)
    by_kind = {x.kind: x for x in info.value.problems}
    occ = by_kind["occupied_exceeds_household"]
    # B3: 5 occupied units (rows 6, 7 and the three added at 9..11) for 3 household persons
    assert occ.count == 2 and occ.first_rows == (6, 7, 9, 10, 11)
    assert occ.blocks == (f"{B3}: 5 occupied units, 3 household persons",)
    assert occ.examples[0] == f"unit u7 block {B3} kind 0"
    gq = by_kind["gq_without_facility"]
    assert gq.count == 1 and gq.first_rows == (12,) and gq.examples == (f"block {B3} hhgq 5",)
    assert f"first rows (0-based): 12: block {B3} hhgq 5; blocks: {B3}: type 5: 1 persons, 0 facilities" in str(info.value)


def test_message_without_values_hides_microdata(tmp_path: Path) -> None:
    p, u, _ = CASES["gq_person_without_facility"](tmp_path)
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, u)
    full, safe = info.value.message(), info.value.message(values=False)
    assert B3 in full and B3 not in safe
    assert "gq_without_facility" in safe and "column 'hhgq'" in safe and "first rows (0-based): 12" in safe


@pytest.mark.parametrize("dup", [False, True])
def test_distinct_ids_counted_in_hash_range_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dup: bool) -> None:
    """Beyond IDS_PER_PASS ids the duplicate check counts distinct ids one hash range at a time
    (bounded memory): the same verdict as one pass, with or without a duplicate."""
    from pipeline.inputs import row_checks

    units = _set(units_df(), 4, unit_id="u2") if dup else units_df()
    p, u = _paths(tmp_path, None, units)
    monkeypatch.setattr(row_checks, "IDS_PER_PASS", 2)  # 9 units: 5 passes
    if not dup:
        assert validate_inputs(p, u).summary.units_rows == 9
        return
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, u)
    _assert_problems(info.value, _resolve([("units", "unit_id", "duplicate_id")], p, u))
