"""Histograms: block histogram equals a naive count, levels sum consistently, Parquet round trip,
unit counts. Property tests run on random microdata (hypothesis)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.inputs.histograms import UnitCounts, aggregate_up, build_person_histograms, build_unit_counts
from pipeline.model.geography import Geography
from pipeline.model.histogram import HistogramError, SparseHistogram
from pipeline.model.spec import load_spec

SPEC = load_spec("pl94")
ATTRS = ["hhgq", "voting_age", "hispanic", "cenrace"]

_block = st.tuples(st.sampled_from(["01", "44"]), st.sampled_from(["001", "003"]),
                   st.sampled_from(["000100", "000200"]), st.sampled_from("12"),
                   st.sampled_from(["000", "001", "205"])).map("".join)
_PERSON = (st.integers(0, 7), st.integers(0, 1), st.integers(0, 1), st.integers(1, 63))


def _frame(rows: list[tuple[str, int, int, int, int]]) -> pl.DataFrame:
    cols = list(zip(*rows)) if rows else [[]] * 5
    return pl.DataFrame({"geoid": pl.Series(cols[0], dtype=pl.Utf8),
                         **{a: pl.Series(c, dtype=pl.Int8) for a, c in zip(ATTRS, cols[1:])}})


def _naive(rows, geo: Geography, level: str) -> np.ndarray:
    lv = geo.level(level)
    out = np.zeros((lv.n_units, SPEC.n_cells), dtype=np.int64)
    index = {g: i for i, g in enumerate(lv.geoids.tolist())}
    for g, h, v, hi, r in rows:
        out[index[g[: lv.digits]], ((h * 2 + v) * 2 + hi) * 63 + r - 1] += 1
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(_block, min_size=1, max_size=12, unique=True), st.data())
def test_histograms_equal_naive_count_and_sum_consistently(blocks, data):
    persons = data.draw(st.lists(st.tuples(st.sampled_from(blocks), *_PERSON), max_size=80))
    geo = Geography.from_block_geoids(blocks)
    hists = build_person_histograms(_frame(persons).lazy(), geo, SPEC)
    assert list(hists) == [lv.name for lv in geo.levels]
    for lv in geo.levels:
        h = hists[lv.name]
        assert h.level == lv.name and h.n_units == lv.n_units and h.n_cells == SPEC.n_cells
        assert (h.count > 0).all()
        # the internally built arrays pass every check of the public constructor
        SparseHistogram(h.level, h.n_units, h.n_cells, h.unit, h.cell, h.count)
        assert h.unit.dtype == h.cell.dtype == h.count.dtype == np.int64
        # equal to a naive count at every level
        np.testing.assert_array_equal(h.dense(), _naive(persons, geo, lv.name))
        # every level sums to the same total
        assert h.total() == len(persons) and h.totals().sum() == len(persons)
    for k in range(len(geo.levels) - 1):
        up, down = geo.levels[k], geo.levels[k + 1]
        child = hists[down.name].dense()
        parent = hists[up.name].dense()
        for i in range(up.n_units):  # parent = sum of its children
            np.testing.assert_array_equal(parent[i], child[up.children(i)].sum(axis=0))


def test_dense_slices_totals_and_parquet_round_trip(tmp_path):
    x = np.zeros((5, 7), dtype=np.int64)
    x[0, 3] = 2
    x[2, 0] = 1
    x[2, 6] = 4
    x[4, 1] = 9
    h = SparseHistogram.from_dense("block", x)
    assert h.unit.tolist() == [0, 2, 2, 4] and h.cell.tolist() == [3, 0, 6, 1]
    np.testing.assert_array_equal(h.dense(1, 4), x[1:4])
    np.testing.assert_array_equal(h.dense(), x)
    assert h.dense(2, 2).shape == (0, 7)
    assert h.totals().tolist() == [2, 0, 5, 0, 9]
    h.to_parquet(tmp_path / "h.parquet")
    back = SparseHistogram.from_parquet(tmp_path / "h.parquet")
    assert back.equals(h) and back.level == "block" and back.n_units == 5 and back.n_cells == 7
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_invalid_sparse_histograms_are_refused(tmp_path):
    with pytest.raises(HistogramError, match="sorted"):
        SparseHistogram("b", 3, 4, [1, 0], [0, 0], [1, 1])
    with pytest.raises(HistogramError, match="non-positive"):
        SparseHistogram("b", 3, 4, [0, 1], [0, 0], [1, 0])
    with pytest.raises(HistogramError, match="out of range"):
        SparseHistogram("b", 3, 4, [0, 1], [0, 4], [1, 1])
    with pytest.raises(HistogramError, match="sorted"):
        SparseHistogram("b", 3, 4, [0, 0], [2, 2], [1, 1])
    pl.DataFrame({"unit": [0]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(HistogramError, match="x.parquet"):
        SparseHistogram.from_parquet(tmp_path / "x.parquet")
    (tmp_path / "y.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(HistogramError, match="y.parquet"):
        SparseHistogram.from_parquet(tmp_path / "y.parquet")


def test_out_of_domain_codes_and_unknown_blocks_are_refused():
    geo = Geography.from_block_geoids(["010010001001000", "010010001001001"])
    ok = ("010010001001000", 0, 1, 0, 1)
    for bad in [("010010001001000", 8, 1, 0, 1), ("010010001001000", 0, 2, 0, 1),
                ("010010001001000", 0, 1, 0, 64), ("010010001001000", 0, 1, -1, 1)]:
        with pytest.raises(HistogramError, match="outside"):
            build_person_histograms(_frame([ok, bad]), geo, SPEC)
    with pytest.raises(HistogramError, match="010010001001009"):
        build_person_histograms(_frame([ok, ("010010001001009", 0, 1, 0, 1)]), geo, SPEC)


def test_aggregate_up_at_top_is_an_error():
    geo = Geography.from_block_geoids(["010010001001000"])
    h = build_person_histograms(_frame([("010010001001000", 0, 1, 0, 1)]), geo, SPEC)
    with pytest.raises(HistogramError, match="top level"):
        aggregate_up(h["nation"], geo)
    assert aggregate_up(h["block"], geo).equals(h["block_group"])


@settings(max_examples=40, deadline=None)
@given(st.lists(_block, min_size=1, max_size=10, unique=True), st.data())
def test_unit_counts_equal_naive_and_sum_consistently(blocks, data):
    rows = data.draw(st.lists(st.tuples(st.sampled_from(blocks), st.integers(0, 7), st.booleans()), max_size=60))
    geo = Geography.from_block_geoids(blocks)
    units = pl.DataFrame({
        "unit_id": [str(i) for i in range(len(rows))],
        "geoid": pl.Series([r[0] for r in rows], dtype=pl.Utf8),
        "kind": pl.Series([r[1] for r in rows], dtype=pl.Int8),
        "occupied": pl.Series([r[2] if r[1] == 0 else None for r in rows], dtype=pl.Boolean),
    })
    counts = build_unit_counts(units.lazy(), geo)
    assert list(counts) == [lv.name for lv in geo.levels]
    for lv in geo.levels:
        c = counts[lv.name]
        assert isinstance(c, UnitCounts) and c.level == lv.name
        assert c.housing_units.shape == (lv.n_units,) and c.facilities.shape == (lv.n_units, 7)
        idx = {g: i for i, g in enumerate(lv.geoids.tolist())}
        hu = np.zeros(lv.n_units, np.int64)
        occ = np.zeros(lv.n_units, np.int64)
        fac = np.zeros((lv.n_units, 7), np.int64)
        for g, k, o in rows:
            i = idx[g[: lv.digits]]
            if k == 0:
                hu[i] += 1
                occ[i] += o
            else:
                fac[i, k - 1] += 1
        np.testing.assert_array_equal(c.housing_units, hu)
        np.testing.assert_array_equal(c.occupied, occ)
        np.testing.assert_array_equal(c.facilities, fac)


def test_sorted_and_dense_aggregation_agree(monkeypatch):
    import pipeline.inputs.histograms as H

    rng = np.random.default_rng(5)
    blocks = sorted({f"{s:02d}{c:03d}{t:06d}{b:04d}" for s, c, t, b in
                     zip(rng.integers(1, 4, 300), rng.integers(1, 6, 300), rng.integers(1, 9, 300), rng.integers(1000, 3999, 300))})
    n = 20_000
    df = pl.DataFrame({"geoid": rng.choice(blocks, n), "hhgq": rng.integers(0, 8, n), "voting_age": rng.integers(0, 2, n),
                       "hispanic": rng.integers(0, 2, n), "cenrace": rng.integers(1, 64, n)})
    geo = Geography.from_block_geoids(blocks)
    dense_path = build_person_histograms(df, geo, SPEC)
    monkeypatch.setattr(H, "DENSE_SUM_LIMIT", 0)
    sorted_path = build_person_histograms(df, geo, SPEC)
    for name in dense_path:
        assert dense_path[name].equals(sorted_path[name]), name
        h = sorted_path[name]
        SparseHistogram(h.level, h.n_units, h.n_cells, h.unit, h.cell, h.count)  # valid
    assert sorted_path["county"].total() == n
    np.testing.assert_array_equal(sorted_path["state"].dense(), _naive(list(df.iter_rows()), geo, "state"))


def test_long_geoids_use_the_overflow_safe_sort():
    from pipeline.model.geography import GeoLevel

    levels = [GeoLevel("nation", 0), GeoLevel("area", 2), GeoLevel("block", 18)]
    blocks = ["990000000000000001", "990000000000000000", "120000000000000007"]
    rows = [(blocks[0], 0, 1, 0, 5), (blocks[1], 3, 1, 1, 63), (blocks[0], 0, 1, 0, 5), (blocks[2], 7, 0, 0, 1)]
    geo = Geography.from_block_geoids(blocks, levels=levels)
    hists = build_person_histograms(_frame(rows), geo, SPEC)
    for lv in geo.levels:
        np.testing.assert_array_equal(hists[lv.name].dense(), _naive(rows, geo, lv.name))


def _random_histogram(rng: np.random.Generator, n_units: int, n_cells: int) -> SparseHistogram:
    dense = rng.integers(0, 3, (n_units, n_cells)) * (rng.random((n_units, n_cells)) < 0.3)
    unit, cell = np.nonzero(dense)
    return SparseHistogram("block", n_units, n_cells, unit, cell, dense[unit, cell])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 40), steps=st.lists(st.integers(0, 9), min_size=1))
def test_histogram_rows_read_in_order_or_not_are_the_file(tmp_path_factory, seed: int, batch: int,
                                                          steps: list[int]) -> None:
    """HistogramRows gives every range of units exactly the file's entries: ranges in increasing
    order (read on from the last, across record batch boundaries), any other range (read by
    itself), and in a pickled copy (which starts afresh)."""
    import pickle

    from pipeline.model.histogram import HistogramRows

    rng = np.random.default_rng(seed)
    h = _random_histogram(rng, 37, 5)
    path = tmp_path_factory.mktemp("rows") / "h.parquet"
    h.to_parquet(path)
    dense = np.zeros((h.n_units, h.n_cells), np.int64)
    dense[h.unit, h.cell] = h.count
    rows = HistogramRows(path)
    rows.BATCH = batch
    assert (rows.n_units, rows.n_cells) == (37, 5)
    start = 0
    for k in steps + [h.n_units]:  # increasing ranges (some empty), then a jump back and on again
        stop = min(start + k, h.n_units)
        assert np.array_equal(rows.rows(start, stop).toarray(), dense[start:stop])
        start = stop
    assert np.array_equal(rows.rows(3, 11).toarray(), dense[3:11])    # back: read by itself
    assert np.array_equal(rows.rows(11, 30).toarray(), dense[11:30])  # and on from there
    copy = pickle.loads(pickle.dumps(rows))
    assert np.array_equal(copy.rows(0, 37).toarray(), dense)


def test_histogram_rows_refuse_a_file_out_of_order(tmp_path) -> None:
    """Entries out of (unit, cell) order across record batches are an error, not missed rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.model.histogram import HistogramRows

    meta = {b"dptab.level": b"block", b"dptab.n_units": b"10", b"dptab.n_cells": b"2"}
    table = pa.table({"unit": np.array([0, 5, 6, 2, 3], np.int64), "cell": np.zeros(5, np.int64),
                      "count": np.ones(5, np.int64)}).replace_schema_metadata(meta)
    pq.write_table(table, tmp_path / "h.parquet")
    rows = HistogramRows(tmp_path / "h.parquet")
    rows.BATCH = 3
    with pytest.raises(HistogramError, match="not sorted"):
        rows.rows(0, 10)
    with pytest.raises(HistogramError, match="metadata"):
        pq.write_table(table.replace_schema_metadata({}), tmp_path / "bare.parquet")
        HistogramRows(tmp_path / "bare.parquet")


_ODD_GEOID = st.sampled_from(["+10010001001000", "01001000100100", "0100100010010000", "01001000100100x",
                              "010010001001009", "44003000200120 "])


@settings(max_examples=60, deadline=None)
@given(st.lists(_block, min_size=1, max_size=8, unique=True), st.data())
def test_keyed_and_string_block_passes_agree(blocks, data):
    """The integer-keyed group_by gives the string pass's arrays, and on a record it cannot place
    (malformed GEOID, unknown block, code outside the spec) the string pass's error."""
    import pipeline.inputs.histograms as H

    geo = Geography.from_block_geoids(blocks)
    persons = data.draw(st.lists(st.tuples(st.one_of(st.sampled_from(blocks), _ODD_GEOID), st.integers(-1, 8),
                                           st.integers(0, 2), st.integers(0, 1), st.integers(0, 64)), max_size=40))
    frame = _frame(persons).lazy()

    def run(keyed: bool):
        try:
            if keyed:
                h = H.build_block_histogram(frame, geo, SPEC)
            else:
                orig = H._keyed_block_histogram
                H._keyed_block_histogram = lambda *a: None
                try:
                    h = H.build_block_histogram(frame, geo, SPEC)
                finally:
                    H._keyed_block_histogram = orig
            return ("ok", h.unit.tolist(), h.cell.tolist(), h.count.tolist(), h.unit.dtype, h.cell.dtype)
        except HistogramError as exc:
            return ("error", str(exc))

    assert run(True) == run(False)
    valid = all(g in blocks and 0 <= h <= 7 and v <= 1 and 1 <= r <= 63 for g, h, v, _, r in persons)
    if valid:  # the keyed pass itself made it (no silent fall back to the strings)
        assert H._keyed_block_histogram(frame, geo.blocks, SPEC) is not None


def test_histogram_writer_pieces_give_the_whole_files_bytes(tmp_path, monkeypatch) -> None:
    """Pieces of a histogram written in order give the file ``pq.write_table`` makes of the
    whole (row groups of ROW_GROUP_ENTRIES entries: 7 here, so a file has several); pieces out
    of order are refused and leave no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.model import histogram as hm

    monkeypatch.setattr(hm, "ROW_GROUP_ENTRIES", 7)
    rng = np.random.default_rng(5)
    h = _random_histogram(rng, 30, 12)
    table = pa.table({"unit": h.unit, "cell": h.cell, "count": h.count}).replace_schema_metadata(
        {b"dptab.level": b"block", b"dptab.n_units": b"30", b"dptab.n_cells": b"12"})
    pq.write_table(table, tmp_path / "whole.parquet", compression="zstd", row_group_size=7)
    for cuts in ([], [3, 3, 17], [1, 2, 29]):
        with hm.HistogramWriter(tmp_path / "pieces.parquet", "block", 30, 12) as w:
            for a, b in zip([0, *cuts], [*cuts, 30]):
                lo, hi = np.searchsorted(h.unit, [a, b])
                w.add(SparseHistogram("block", 30, 12, h.unit[lo:hi], h.cell[lo:hi], h.count[lo:hi]))
        assert (tmp_path / "pieces.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
        assert pq.ParquetFile(tmp_path / "pieces.parquet").metadata.num_row_groups == -(-h.nnz // 7)
    with pytest.raises(HistogramError, match="order"):
        with hm.HistogramWriter(tmp_path / "bad.parquet", "block", 30, 12) as w:
            w.add(h)
            w.add(h)
    assert not list(tmp_path.glob("*bad.parquet*"))


def test_invariants_read_whole_or_housing_units_only(tmp_path) -> None:
    """A level's invariants file read back whole, or only its housing units (what a release
    publishes of the blocks), with or without that column declared."""
    from pipeline.inputs.invariants import LevelInvariants, read_invariants, write_invariants

    hu = np.array([3, 0, 7])
    fac = np.arange(21).reshape(3, 7)
    for declared in (LevelInvariants("block", persons=None, housing_units=hu, facilities=fac),
                     LevelInvariants("block", persons=None, housing_units=None, facilities=fac),
                     LevelInvariants("block", persons=None, housing_units=None, facilities=None)):
        path = tmp_path / "block.parquet"
        write_invariants(declared, path, 3)
        whole = read_invariants("block", path)
        assert (whole.housing_units is None) == (declared.housing_units is None)
        assert (whole.facilities is None) == (declared.facilities is None)
        if declared.facilities is not None:
            np.testing.assert_array_equal(whole.facilities, fac)
        only = read_invariants("block", path, housing_units_only=True)
        assert only.facilities is None and only.persons is None
        if declared.housing_units is None:
            assert only.housing_units is None
        else:
            np.testing.assert_array_equal(only.housing_units, hu)
            np.testing.assert_array_equal(whole.housing_units, hu)


@pytest.mark.parametrize("group_rows", [1, 4, 1 << 16])
def test_invariants_read_a_unit_range(tmp_path, monkeypatch, group_rows) -> None:
    """A shard's units read from the invariants file's row groups that hold them (any range:
    inside one group, across groups, empty, at either end) are the whole file's rows."""
    import pyarrow.parquet as pq

    from pipeline.inputs import invariants as inv

    monkeypatch.setattr(inv, "INVARIANT_GROUP_ROWS", group_rows)
    n = 11
    declared = inv.LevelInvariants("block", persons=np.arange(n) * 3, housing_units=np.arange(n) % 4,
                                   facilities=np.arange(n * 7).reshape(n, 7))
    path = tmp_path / "block.parquet"
    inv.write_invariants(declared, path, n)
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // group_rows)
    for start in range(n + 1):
        for stop in range(start, n + 1):
            part = inv.read_invariants("block", path, units=(start, stop))
            np.testing.assert_array_equal(part.persons, declared.persons[start:stop])
            np.testing.assert_array_equal(part.housing_units, declared.housing_units[start:stop])
            np.testing.assert_array_equal(part.facilities, declared.facilities[start:stop])
    with pytest.raises(ValueError, match="outside"):
        inv.read_invariants("block", path, units=(3, n + 1))
