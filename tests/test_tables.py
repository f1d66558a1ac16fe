"""P.L. 94-171 table definitions, tabulation and the consistency checks (pipeline.tables, pipeline.checks)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tables_cases import make_case

from pipeline.model.spec import load_spec
from pipeline.release.checks import Invariants, run_checks
from pipeline.release.tables import TableError, load_tables, long_frame, tabulate, tabulate_levels, unit_names

TS = load_tables("pl94")
SPEC = load_spec("pl94")


def digits(geo) -> dict[str, int]:
    return {lv.name: lv.digits for lv in geo.levels}


def test_shells_have_census_line_counts_and_labels() -> None:
    assert {n: t.n_lines for n, t in TS.tables.items()} == {"P1": 71, "P2": 73, "P3": 71, "P4": 73, "P5": 10, "H1": 3}
    p1, p2 = TS.tables["P1"], TS.tables["P2"]
    race = SPEC.attribute("cenrace").labels
    assert p1.numbers == tuple(range(1, 72)) and p2.numbers == tuple(range(1, 74))
    assert p1.labels[0] == "Total:" and p1.labels[8] == "Population of two or more races:"
    assert p1.labels[2:8] == race[:6]                       # lines 3-8: the six races alone
    assert p1.labels[10:25] == race[6:21]                   # lines 11-25: the 15 pairs, CENRACE order
    assert p1.labels[70] == race[62]                        # line 71: all six
    assert p2.labels[1:3] == ("Hispanic or Latino", "Not Hispanic or Latino:")
    assert p2.labels[3:] == p1.labels[1:]                   # P2 4-73 = P1 2-71 labels
    assert TS.tables["P5"].labels[4] == "Nursing facilities/Skilled-nursing facilities"
    assert TS.tables["H1"].labels == ("Total:", "Occupied", "Vacant")


def test_line_filters_select_the_right_cells() -> None:
    codes = SPEC.cell_codes(np.arange(SPEC.n_cells))
    m = {n: t.matrix.toarray().astype(bool) for n, t in TS.tables.items()}
    assert m["P1"][0].all()                                       # total: every cell
    assert np.array_equal(m["P1"][2], codes["cenrace"] == 1)      # White alone
    assert np.array_equal(m["P1"][8], codes["cenrace"] >= 7)      # two or more races
    assert np.array_equal(m["P1"][70], codes["cenrace"] == 63)
    assert np.array_equal(m["P2"][1], codes["hispanic"] == 1)
    assert np.array_equal(m["P2"][4], (codes["hispanic"] == 0) & (codes["cenrace"] == 1))
    assert np.array_equal(m["P3"][0], codes["voting_age"] == 1)
    assert np.array_equal(m["P4"][1], (codes["voting_age"] == 1) & (codes["hispanic"] == 1))
    assert np.array_equal(m["P5"][0], codes["hhgq"] >= 1)
    assert np.array_equal(m["P5"][1], np.isin(codes["hhgq"], [1, 2, 3, 4]))
    assert np.array_equal(m["P5"][9], codes["hhgq"] == 7)
    assert np.array_equal(m["H1"], np.array([[1, 1], [0, 1], [1, 0]], dtype=bool))


def test_tabulate_matches_direct_sums() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(7, SPEC.n_cells))
    codes = SPEC.cell_codes(np.arange(SPEC.n_cells))
    p2 = tabulate(x, TS.tables["P2"])
    assert p2.shape == (7, 73) and p2.dtype == np.int64
    assert np.array_equal(p2[:, 0], x.sum(1))
    assert np.array_equal(p2[:, 1], x[:, codes["hispanic"] == 1].sum(1))
    assert np.array_equal(p2[:, 72], x[:, (codes["hispanic"] == 0) & (codes["cenrace"] == 63)].sum(1))
    p5 = tabulate(x, TS.tables["P5"])
    assert np.array_equal(p5[:, 6], x[:, codes["hhgq"] >= 5].sum(1))
    with pytest.raises(TableError):
        tabulate(x[:, :2], TS.tables["P1"])


def test_every_check_passes_on_consistent_release() -> None:
    c = make_case(0)
    lts = tabulate_levels(TS, c.geography, c.persons, c.units)
    assert [lt.level for lt in lts] == ["nation", "state", "county", "tract", "block_group", "block"]
    assert run_checks(TS, lts, digits(c.geography), c.invariants) == []
    # the check lines are computed (household population) and used
    assert lts[0].check_lines["household_population"][0] + lts[0].counts["P5"][0, 0] == lts[0].counts["P1"][0, 0]


def _corrupted(kind: str):
    c = make_case(2)
    lts = tabulate_levels(TS, c.geography, c.persons, c.units)
    by = {lt.level: lt for lt in lts}
    return c, lts, by


@pytest.mark.parametrize("what", ["hierarchy", "additivity", "cross_table", "subset", "non_negative",
                                  "state_invariant", "hu_invariant", "household"])
def test_each_check_catches_its_violation(what: str) -> None:
    c, lts, by = _corrupted(what)
    inv = c.invariants
    blk = by["block"]
    b = int(np.nonzero(blk.counts["P1"][:, 0])[0][0])
    expect_check, expect_table = what, None
    if what == "hierarchy":      # one block line changed alone: its parent no longer adds up (and its table neither)
        blk.counts["P1"][b, 2] += 1
        expect_table = "P1"
    elif what == "additivity":   # tract line 1 moved with its children: only the within-table sum breaks
        for lt in lts:
            lt.counts["P5"][:, 0] += 1
        expect_table = "P5"
    elif what == "cross_table":  # P2 total moved with its parts at every level: only P1 = P2 breaks
        for lt in lts:
            lt.counts["P2"][:, [0, 1]] += 1
        expect_table = "P1"
    elif what == "subset":       # 18+ exceeds total on one line, consistently up the hierarchy
        for lt in lts:
            lt.counts["P3"][:, 70] += lt.counts["P1"][:, 70] + 1
        expect_check, expect_table = "cross_table", "P3"
    elif what == "non_negative":
        blk.counts["H1"][b, 1] = -1
        expect_table = "H1"
    elif what == "state_invariant":
        inv = Invariants({k: v + 1 for k, v in inv.state_totals.items()}, inv.block_geoids, inv.block_housing_units)
        expect_check, expect_table = "invariant", "P1"
    elif what == "hu_invariant":
        hu = inv.block_housing_units.copy()
        hu[3] += 2
        inv = Invariants(inv.state_totals, inv.block_geoids, hu)
        expect_check, expect_table = "invariant", "H1"
    elif what == "household":
        blk.check_lines["household_population"][b] += 1
        expect_check, expect_table = "cross_table", "P1"
    failures = run_checks(TS, lts, digits(c.geography), inv)
    hits = [f for f in failures if f.check == expect_check and f.table == expect_table]
    assert hits, f"{what}: not detected; got {[str(f) for f in failures][:5]}"
    assert all(f.geoid is not None for f in hits) and str(hits[0])


def test_housing_unit_invariant_by_block_codes_finds_what_geoids_find() -> None:
    """The release writer gives the blocks of a digit-prefix geography by their integer codes (8
    bytes a block, not a GEOID string): the housing-unit checks find the same failures, and a
    block missing from the tables is reported by its GEOID."""
    c, lts, by = _corrupted("hu")
    blocks = c.geography.levels[-1]
    hu = c.invariants.block_housing_units.copy()
    hu[3] += 2  # a published count no longer equal to its invariant
    gone = int(np.nonzero(hu > 0)[0][-1])  # a block with housing units left out of the tables
    blk = by["block"]
    keep = np.arange(len(blk.geoids)) != gone
    lts[-1] = type(blk)(blk.level, blk.geoids[keep], {k: v[keep] for k, v in blk.counts.items()},
                        {k: v[keep] for k, v in blk.check_lines.items()})
    found = {}
    for kind, named in (("geoids", np.asarray(blocks.geoids)), ("codes", blocks.codes)):
        inv = Invariants(c.invariants.state_totals, named, hu)
        fails = [f for f in run_checks(TS, lts, digits(c.geography), inv) if f.check == "invariant"]
        found[kind] = sorted(str(f) for f in fails)
    assert found["codes"] == found["geoids"]
    assert any(blocks.geoids[3] in f for f in found["codes"])
    assert any(blocks.geoids[gone] in f and "not published" in f for f in found["codes"])


def test_failures_are_capped_with_a_summary() -> None:
    c, lts, by = _corrupted("many")
    by["block"].counts["P1"][:, 2] += 1  # every block: many failures
    fails = run_checks(TS, lts, digits(c.geography), c.invariants, limit=3)
    summaries = [f for f in fails if "more failures" in f.detail]
    assert summaries and len(fails) < 60


def test_unit_names() -> None:
    assert unit_names("nation", np.array([""]))[0] == "United States"
    assert unit_names("state", np.array(["01", "99"])).tolist() == ["Alabama", "State 99"]
    assert unit_names("county", np.array(["01105"]))[0] == "Perry County, Alabama"
    assert unit_names("tract", np.array(["01105686800", "01105000101"])).tolist() == ["Census Tract 6868", "Census Tract 1.01"]
    assert unit_names("block_group", np.array(["011056868001"]))[0] == "Block Group 1"
    assert unit_names("block", np.array(["011056868001000"]))[0] == "Block 1000"


def test_long_frame_layout() -> None:
    t = TS.tables["H1"]
    counts = np.array([[5, 3, 2], [0, 0, 0]], dtype=np.int64)
    df = long_frame(t, "block", np.array(["011056868001000", "011056868001001"]),
                    np.array(["Block 1000", "Block 1001"], dtype=object), counts, np.array([0.0, 2.6, np.nan]))
    assert df.columns == ["geoid", "geolevel", "name", "table", "line", "label", "count", "moe90"]
    assert df.height == 6 and df["line"].to_list() == [1, 2, 3, 1, 2, 3]
    assert df["count"].to_list() == [5, 3, 2, 0, 0, 0]
    assert df["moe90"].to_list() == [0.0, 2.6, None, 0.0, 2.6, None]
    assert df["label"][1] == "Occupied" and df["geolevel"].unique().to_list() == ["block"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), pick=st.integers(0, 10**9), delta=st.integers(-5, 5).filter(bool))
def test_any_single_changed_count_is_caught(seed: int, pick: int, delta: int) -> None:
    """Changing one published count anywhere (any level, table, unit, line) fails some check."""
    c = make_case(seed % 7, n_blocks=25, cells_per_block=6)
    lts = tabulate_levels(TS, c.geography, c.persons, c.units)
    slots = [(i, name) for i, lt in enumerate(lts) for name in lt.counts]
    i, name = slots[pick % len(slots)]
    arr = lts[i].counts[name]
    r, col = (pick // 7) % arr.shape[0], (pick // 13) % arr.shape[1]
    arr[r, col] += delta
    assert run_checks(TS, lts, digits(c.geography), c.invariants)


def test_long_tables_cover_every_level() -> None:
    from pipeline.release.tables import long_tables

    c = make_case(9, n_blocks=20)
    lts = tabulate_levels(TS, c.geography, c.persons, c.units)
    frames = long_tables(TS, lts)
    n_units = sum(lv.n_units for lv in c.geography.levels)
    assert {k: v.height for k, v in frames.items()} == {k: t.n_lines * n_units for k, t in TS.tables.items()}
    p1 = frames["P1"].filter((pl.col("geolevel") == "nation") & (pl.col("line") == 1))
    assert p1["count"].to_list() == [int(c.block_dense.sum())]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_checks_fed_in_chunks_find_what_whole_levels_find(seed: int, sizes: list[int]) -> None:
    """The hierarchy comparison runs as the children stream past (a parent is compared once a
    chunk starts after it): any chunking of the levels finds exactly the failures of whole
    levels, here with counts moved at random units and lines of every level (parents whose
    children disagree, in the first, middle and last units)."""
    from pipeline.release.checks import ReleaseChecks
    from pipeline.release.tables import LevelTables
    from pipeline.release.tree import GeoTree

    c = make_case(3)
    lts = tabulate_levels(TS, c.geography, c.persons, c.units)
    rng = np.random.default_rng(seed)
    for lt in lts:
        for name in rng.choice(sorted(lt.counts), 2, replace=False):
            for unit in {0, len(lt.geoids) - 1, int(rng.integers(len(lt.geoids)))}:
                lt.counts[name][unit, int(rng.integers(lt.counts[name].shape[1]))] += int(rng.integers(1, 4))
    whole = run_checks(TS, lts, digits(c.geography), c.invariants, limit=10_000)
    assert any(f.check == "hierarchy" for f in whole)
    checks = ReleaseChecks(TS, GeoTree.of(digits(c.geography), [lt.level for lt in lts]), c.invariants, 10_000)
    for i, lt in enumerate(lts):
        checks.begin_level(lt.level, keep=i + 1 < len(lts))
        s, k = 0, 0
        while s < len(lt.geoids):
            e = min(s + sizes[k % len(sizes)], len(lt.geoids))
            checks.add(LevelTables(lt.level, lt.geoids[s:e], {n: v[s:e] for n, v in lt.counts.items()},
                                   {n: v[s:e] for n, v in lt.check_lines.items()}))
            s, k = e, k + 1
        checks.end_level()
    assert sorted(map(repr, checks.failures())) == sorted(map(repr, whole))


def test_kept_parent_counts_are_narrowed_without_changing_a_value() -> None:
    """The hierarchy check keeps a parent level in the narrowest integer type holding it: every
    value survives, at the int16 / int32 edges and beyond them."""
    from pipeline.release.checks import _narrow

    for values, dtype in (([0, 32767], np.int16), ([-32768, 5], np.int16), ([0, 32768], np.int32),
                          ([-(2**31), 2**31 - 1], np.int32), ([0, 2**31], np.int64), ([], np.int64)):
        a = np.array(values, dtype=np.int64).reshape(-1, 1)
        got = _narrow(a)
        assert got.dtype == dtype and np.array_equal(got.astype(np.int64), a)
