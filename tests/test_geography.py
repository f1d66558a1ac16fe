"""Geography: levels from GEOID prefixes, parent pointers and CSR children, on hand-made and random blocks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model.geography import Geography, GeographyError, GeoLevel, load_geolevels

BLOCKS = ["010010201001000", "010010201001001", "010010201002000", "010030201001000", "020010000001000"]


def test_levels_from_yaml_are_the_census_levels():
    levels = load_geolevels()
    assert [(lv.name, lv.digits) for lv in levels] == [
        ("nation", 0), ("state", 2), ("county", 5), ("tract", 11), ("block_group", 12), ("block", 15)]


def test_small_hierarchy_by_hand():
    geo = Geography.from_block_geoids(list(reversed(BLOCKS)) + BLOCKS[:2])  # unsorted, duplicates
    assert [lv.name for lv in geo.levels] == ["nation", "state", "county", "tract", "block_group", "block"]
    assert geo.level("nation").geoids.tolist() == [""]
    assert geo.level("state").geoids.tolist() == ["01", "02"]
    assert geo.level("county").geoids.tolist() == ["01001", "01003", "02001"]
    assert geo.level("block_group").geoids.tolist() == ["010010201001", "010010201002", "010030201001", "020010000001"]
    assert geo.level("block").geoids.tolist() == BLOCKS
    assert geo.level("block").geoids.dtype == np.dtype("<U15")
    assert geo.level("block").parent.tolist() == [0, 0, 1, 2, 3]
    assert geo.level("county").parent.tolist() == [0, 0, 1]
    assert geo.level("nation").parent.tolist() == [-1]
    assert geo.level("state").child_ptr.tolist() == [0, 2, 3]
    assert geo.level("block_group").child_ptr.tolist() == [0, 2, 3, 4, 5]
    assert geo.level("block").child_ptr.tolist() == [0] * 6
    assert geo.level("block").index_of(["020010000001000", "010010201001001"]).tolist() == [4, 1]
    assert geo.ancestor_index("county", np.array([0, 3, 4])).tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", [["01001020100100"], ["0100102010010a0"], ["0100102010010000"], [""]])
def test_malformed_geoids_are_refused_with_examples(bad):
    with pytest.raises(GeographyError) as exc:
        Geography.from_block_geoids(BLOCKS + bad)
    assert repr(bad[0]) in str(exc.value) and "15-digit" in str(exc.value)


def test_unknown_geoid_lookup_names_it():
    geo = Geography.from_block_geoids(BLOCKS)
    with pytest.raises(GeographyError, match="020010000001999"):
        geo.level("block").index_of(["020010000001999"])
    with pytest.raises(GeographyError, match="no level"):
        geo.level("zip")


def test_custom_levels_and_bad_levels():
    geo = Geography.from_block_geoids(BLOCKS, levels=[GeoLevel("top", 0), GeoLevel("st", 2), GeoLevel("blk", 15)])
    assert [lv.n_units for lv in geo.levels] == [1, 2, 5]
    with pytest.raises(GeographyError, match="increase"):
        Geography.from_block_geoids(BLOCKS, levels=[GeoLevel("a", 5), GeoLevel("b", 2)])


def test_empty_geography_has_a_nation():
    geo = Geography.from_block_geoids(np.array([], dtype="<U15"))
    assert [lv.n_units for lv in geo.levels] == [1, 0, 0, 0, 0, 0]
    assert geo.level("nation").child_ptr.tolist() == [0, 0]


_digits = st.tuples(st.sampled_from(["01", "02", "44"]), st.sampled_from(["001", "007"]),
                    st.sampled_from(["000100", "020300"]), st.sampled_from("129"),
                    st.sampled_from(["000", "001", "999"])).map("".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(_digits, min_size=1, max_size=60))
def test_random_hierarchies_are_consistent(blocks):
    geo = Geography.from_block_geoids(blocks)
    for k, lv in enumerate(geo.levels):
        # sorted unique prefixes of the blocks
        assert lv.geoids.tolist() == sorted({b[: lv.digits] for b in blocks})
        if k == 0:
            assert lv.parent.tolist() == [-1]
            continue
        up = geo.levels[k - 1]
        # each unit's parent is the unit whose GEOID is its prefix
        assert [up.geoids[p] for p in lv.parent] == [g[: up.digits] for g in lv.geoids]
        # CSR children of the level above are exactly the units pointing at it
        assert up.child_ptr[0] == 0 and up.child_ptr[-1] == lv.n_units
        for i in range(up.n_units):
            assert (lv.parent[up.children(i)] == i).all()
        assert (up.n_children() >= 1).all()


@pytest.mark.parametrize("bad", ["+10010201001000", " 10010201001000", "01001020100100 ", "-10010201001000",
                                 "01001020100100\u0661", "0100102010010.0", None])
def test_geoid_parse_rejects_signs_spaces_and_non_ascii(bad):
    from pipeline.model.geography import geoid_codes

    with pytest.raises(GeographyError, match="1 block GEOIDs are not 15-digit"):
        geoid_codes(pl.Series([BLOCKS[0], bad], dtype=pl.Utf8), 15, what="block GEOIDs")
    assert geoid_codes(pl.Series(BLOCKS), 15).tolist() == [int(b) for b in BLOCKS]


def test_geoids_of_a_range_without_the_strings_cached():
    """A range of a level's GEOIDs made from its codes equals the cached strings' range (every
    level, nation included), and a copy sent to a child process carries no strings."""
    import pickle

    from pipeline.release.writer import _without_strings

    geo = Geography.from_block_geoids(BLOCKS)
    for lv in geo.levels:
        bare = _without_strings(lv)
        for s, e in [(0, lv.n_units), (1, 3), (lv.n_units, lv.n_units)]:
            got = bare.geoids_of(s, e)
            assert got.tolist() == lv.geoids[s:e].tolist() and got.dtype == lv.geoids.dtype
        assert "geoids" not in bare.__dict__
        assert "geoids" not in pickle.loads(pickle.dumps(bare)).__dict__
