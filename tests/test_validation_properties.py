"""Property tests (hypothesis) of validation on random consistent persons/units data.

- every consistent dataset validates, and its summary equals naive Python counts;
- one out-of-domain attribute value gives exactly one problem, naming its column and row
  (no knock-on block problems from the bad row);
- dropping a block's only type-k facility gives gq_without_facility for exactly its persons;
- random text in a PPMF column is flagged at its row exactly when an independent reference
  rule says it is invalid.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from io_cases import persons_df, to_ppmf, units_df, write  # noqa: E402

from pipeline.inputs.problems import InputValidationError
from pipeline.inputs.validation import validate_inputs  # noqa: E402

POOL = ["010010201001000", "010010201001001", "010010202002005", "020130001001234", "440070101001003",
        "440070101002000"]


@st.composite
def datasets(draw) -> tuple[list[tuple], list[tuple]]:
    """Consistent (persons rows, units rows): facilities <= GQ persons of the type, household
    persons only with >= 1 occupied unit, occupied units <= household persons."""
    blocks = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=len(POOL), unique=True))
    persons, units = [], []
    for b in blocks:
        hh = draw(st.integers(0, 6))
        gq = draw(st.dictionaries(st.integers(1, 7), st.integers(1, 3), max_size=3))
        for k in [0] * hh + [k for k, n in gq.items() for _ in range(n)]:
            va = 1 if k == 3 else draw(st.integers(0, 1))
            persons.append((b, k, va, draw(st.integers(0, 1)), draw(st.integers(1, 63))))
        occ = draw(st.integers(1, hh)) if hh else 0
        vac = draw(st.integers(0, 2))
        units += [(b, 0, True)] * occ + [(b, 0, False)] * vac
        units += [(b, k, None) for k, n in gq.items() for _ in range(draw(st.integers(1, n)))]
    if not persons:
        persons.append((blocks[0], 1, 1, 0, 1))
        units.append((blocks[0], 1, None))
    persons = draw(st.permutations(persons))
    units = [(f"id{i}", *u) for i, u in enumerate(draw(st.permutations(units)))]
    return persons, units


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=datasets(), ppmf=st.booleans())
def test_consistent_data_validates_with_naive_summary(tmp_path_factory, data, ppmf) -> None:
    prows, urows = data
    d = tmp_path_factory.mktemp("ok")
    p = persons_df(prows)
    v = validate_inputs(write(to_ppmf(p) if ppmf else p, d / "p.parquet"), write(units_df(urows), d / "u.parquet"))
    s = v.summary
    assert s.persons_rows == len(prows) and s.units_rows == len(urows)
    assert s.gq_persons == sum(r[1] > 0 for r in prows)
    assert s.household_persons == sum(r[1] == 0 for r in prows)
    assert s.housing_units == sum(u[2] == 0 for u in urows)
    assert s.occupied_units == sum(u[3] is True for u in urows)
    assert s.gq_facilities == sum(u[2] > 0 for u in urows)
    assert s.blocks == len({u[1] for u in urows}) and s.person_blocks == len({r[0] for r in prows})
    assert v.persons.collect().rows() == [tuple(r) for r in prows]


BAD = {"hhgq": st.integers(8, 99), "voting_age": st.integers(2, 9), "hispanic": st.sampled_from([-1, 2, 7]),
       "cenrace": st.sampled_from([0, 64, 99, -5])}


@SETTINGS
@given(data=datasets(), column=st.sampled_from(sorted(BAD)), pick=st.data())
def test_one_bad_value_is_one_problem(tmp_path_factory, data, column, pick) -> None:
    prows, urows = data
    row = pick.draw(st.integers(0, len(prows) - 1))
    value = pick.draw(BAD[column])
    p = persons_df(prows).with_columns(pl.when(pl.int_range(pl.len()) == row).then(value)
                                       .otherwise(pl.col(column)).cast(pl.Int8).alias(column))
    d = tmp_path_factory.mktemp("bad")
    with pytest.raises(InputValidationError) as info:
        validate_inputs(write(p, d / "p.parquet"), write(units_df(urows), d / "u.parquet"))
    (prob,) = info.value.problems
    assert (prob.column, prob.kind, prob.count, prob.first_rows, prob.examples) == (
        column, "out_of_domain", 1, (row,), (str(value),))


@SETTINGS
@given(data=datasets(), pick=st.data())
def test_missing_facility_flags_exactly_its_persons(tmp_path_factory, data, pick) -> None:
    prows, urows = data
    facilities = [(u[1], u[2]) for u in urows if u[2] > 0]
    assume(facilities)
    block, kind = pick.draw(st.sampled_from(facilities))
    urows = [u for u in urows if (u[1], u[2]) != (block, kind)]
    if not any(u[1] == block for u in urows):  # keep the block in the units file
        urows.append(("extra", block, 0, False))
    d = tmp_path_factory.mktemp("fac")
    p = write(persons_df(prows), d / "p.parquet")
    with pytest.raises(InputValidationError) as info:
        validate_inputs(p, write(units_df(urows), d / "u.parquet"))
    gq = [q for q in info.value.problems if q.kind == "gq_without_facility"]
    assert len(gq) == 1 and gq[0].count == sum(1 for r in prows if (r[0], r[1]) == (block, kind))
    assert gq[0].blocks[0].startswith(f"{block}: type {kind}:")
    hit = [i for i, r in enumerate(prows) if (r[0], r[1]) == (block, kind)]
    assert gq[0].first_rows == tuple(hit[:5])


PPMF_TEXT = {"TABBLKST": ("digits", 2), "TABBLKCOU": ("digits", 3), "TABTRACTCE": ("digits", 6),
             "TABBLK": ("digits", 4), "GQTYPE_PL": ("integer", (0, 7)), "VOTING_AGE": ("integer", (1, 2)),
             "CENHISP": ("integer", (1, 2)), "CENRACE": ("integer", (1, 63))}


def _text_valid(kind: str, arg, v: str) -> bool:
    """Reference rule, written independently of the polars expressions."""
    import re

    if kind == "digits":
        return len(v) == arg and all(ch in "0123456789" for ch in v)
    return re.fullmatch(r"[+-]?[0-9]+", v) is not None and arg[0] <= int(v) <= arg[1]


@SETTINGS
@given(column=st.sampled_from(sorted(PPMF_TEXT)), pick=st.data(),
       value=st.one_of(st.text(max_size=8), st.text(alphabet="0123456789+- ", max_size=7)))
def test_random_text_in_ppmf_columns(tmp_path_factory, column, pick, value) -> None:
    prows = [r for r in persons_df().rows()]
    row = pick.draw(st.integers(0, len(prows) - 1))
    p = to_ppmf(persons_df()).with_columns(pl.col(column).cast(pl.String))
    p = p.with_columns(pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))
    d = tmp_path_factory.mktemp("txt")
    kind, arg = PPMF_TEXT[column]
    try:
        validate_inputs(write(p, d / "p.parquet"), write(units_df(), d / "u.parquet"))
        problems = []
    except InputValidationError as err:
        problems = err.problems
    # row-level kinds only: a valid but different value may break a cross-file constraint
    row_kinds = {"wrong_length", "non_digit", "non_integer", "out_of_domain", "null"}
    mine = [q for q in problems if q.column == column and row in q.first_rows and q.kind in row_kinds]
    if _text_valid(kind, arg, value):
        assert not mine, problems
    else:
        assert len(mine) == 1 and mine[0].kind != "null", problems
