"""Measurements: contract columns, exact noise scale, parent-zero skipping, write-once files."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.model.design import discrete_gaussian_variance
from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import load_spec
from pipeline.model.strategy import load_strategy
from pipeline.privacy.measure import COLUMNS, MeasurementError, load_measurements, measure_shard, reused_measurements
from pipeline.privacy.randomness import keyed_source, seeded_source

SPEC = load_spec("pl94")
STRATEGY = load_strategy("census2020_pl94")


def _blocks(n_units: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.03, size=(n_units, SPEC.n_cells))
    x[:, SPEC.structural_zero_mask] = 0
    return x


def _files(tmp_path: Path, seed: int, split: int, keys: tuple[int, int]) -> tuple[list[Path], Path]:
    """Measurements of 40 blocks: two complete files (units 0:split, split:40) and one file of
    all 40 with the answers skipped whose parent (4 block groups of 10) answer is zero."""
    h = SparseHistogram.from_dense("block", _blocks(40, seed=seed))
    paths = [measure_shard(tmp_path / f"m{s}.parquet", h, SPEC, STRATEGY, "block", lo, hi,
                           seeded_source(keys[0], s), full=True).path
             for s, (lo, hi) in enumerate([(0, split), (split, 40)])]
    parent = SparseHistogram.from_dense("block_group", h.dense(0, 40).reshape(4, 10, -1).sum(axis=1))
    skipped = measure_shard(tmp_path / "skip.parquet", h, SPEC, STRATEGY, "block", 0, 40, seeded_source(keys[1]),
                            parent=parent, parent_of=np.repeat(np.arange(4), 10)).path
    return paths, skipped


def _from_rows(rows: pl.DataFrame, q: str, lo: int, hi: int) -> np.ndarray:
    """The matrix of query ``q`` for units ``lo:hi`` built from measurement rows (NaN where none;
    a repeated answer: the last row)."""
    want = np.full((hi - lo, SPEC.query(q).n_answers), np.nan)
    mine = rows.filter((pl.col("query") == q) & (pl.col("unit") >= lo) & (pl.col("unit") < hi))
    want[mine["unit"].to_numpy() - lo, mine["answer"].to_numpy()] = mine["value"].to_numpy()
    return want


def test_full_measurement_contract_and_noise_scale(tmp_path: Path):
    x = _blocks()
    h = SparseHistogram.from_dense("block", x)
    res = measure_shard(tmp_path / "m.parquet", h, SPEC, STRATEGY, "block", 20, 120,
                        seeded_source(1, "block", 0), full=True)
    n_answers = sum(SPEC.query(q).n_answers for q in STRATEGY.queries("block"))
    assert res.drawn and res.rows == 100 * n_answers and res.skipped == 0
    df = pl.read_parquet(res.path)
    assert tuple(df.columns) == COLUMNS
    assert [str(t) for t in df.dtypes] == ["Int64", "String", "Int32", "Int64", "Float64", "String"]
    assert df["unit"].min() == 20 and df["unit"].max() == 119
    m = load_measurements(res.path, SPEC, 20, 120)
    assert list(m) == list(STRATEGY.queries("block"))
    for q, meas in m.items():
        qq = SPEC.query(q)
        s2 = STRATEGY.sigma2("block", q)
        assert meas.sigma2 == s2 and meas.variance == discrete_gaussian_variance(s2)
        assert meas.values.shape == (100, qq.n_answers) and not np.isnan(meas.values).any()
        resid = meas.values - qq.answer(x[20:120])
        assert np.all(resid == np.rint(resid))  # integer noise
    # detailed: 201,600 residuals with exact variance v; mean and variance within 6 s.e.
    resid = (m["detailed"].values - x[20:120]).ravel()
    v = m["detailed"].variance
    assert abs(resid.mean()) < 6 * np.sqrt(v / resid.size)
    assert abs(resid.var() / v - 1) < 6 * np.sqrt(2 / resid.size) * 1.2


def test_parent_zero_answers_are_skipped(tmp_path: Path):
    x = _blocks(100, seed=3)
    parents = x.reshape(10, 10, -1).sum(axis=1)  # 10 block groups of 10 blocks
    parent = SparseHistogram.from_dense("block_group", parents)
    h = SparseHistogram.from_dense("block", x)
    parent_of = np.repeat(np.arange(10), 10)
    res = measure_shard(tmp_path / "s.parquet", h, SPEC, STRATEGY, "block", 0, 100,
                        seeded_source(2), parent=parent, parent_of=parent_of)
    total_answers = 100 * sum(SPEC.query(q).n_answers for q in STRATEGY.queries("block"))
    assert res.rows + res.skipped == total_answers and res.skipped > 0
    m = load_measurements(res.path, SPEC, 0, 100)
    for q, meas in m.items():
        pans = SPEC.query(q).answer(parents)[parent_of]  # each block's parent answers
        assert np.array_equal(~np.isnan(meas.values), pans > 0), q
    # `full` draws everything even with a parent
    full = measure_shard(tmp_path / "f.parquet", h, SPEC, STRATEGY, "block", 0, 100,
                         seeded_source(2), parent=parent, parent_of=parent_of, full=True)
    assert full.rows == total_answers


def test_written_once_and_reused(tmp_path: Path):
    x = _blocks(30)
    h = SparseHistogram.from_dense("block", x)
    path = tmp_path / "measurements" / "persons" / "block" / "shard-00000.parquet"
    first = measure_shard(path, h, SPEC, STRATEGY, "block", 0, 30, seeded_source(5))
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    again = measure_shard(path, h, SPEC, STRATEGY, "block", 0, 30, seeded_source(6))  # other noise
    assert first.drawn and not again.drawn and again.rows == first.rows
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    with pytest.raises(MeasurementError, match="units=0:30, not 0:20"):
        measure_shard(path, h, SPEC, STRATEGY, "block", 0, 20, seeded_source(5))
    with pytest.raises(MeasurementError, match="full"):
        measure_shard(path, h, SPEC, STRATEGY, "block", 0, 30, seeded_source(5), full=True)
    # what a caller checks before reading the confidential histogram: the same file and checks
    assert reused_measurements(tmp_path / "absent.parquet", STRATEGY, "block", 0, 30) is None
    known = reused_measurements(path, STRATEGY, "block", 0, 30)
    assert known is not None and (known.path, known.rows, known.drawn) == (path, first.rows, False)
    with pytest.raises(MeasurementError, match="units=0:30, not 0:20"):
        reused_measurements(path, STRATEGY, "block", 0, 20)


def test_keyed_noise_is_reproducible(tmp_path: Path):
    key = os.urandom(32)
    h = SparseHistogram.from_dense("block", _blocks(20))
    a = measure_shard(tmp_path / "a.parquet", h, SPEC, STRATEGY, "block", 0, 20, keyed_source(key, "block", 0))
    b = measure_shard(tmp_path / "b.parquet", h, SPEC, STRATEGY, "block", 0, 20, keyed_source(key, "block", 0))
    assert pl.read_parquet(a.path).equals(pl.read_parquet(b.path))
    c = measure_shard(tmp_path / "c.parquet", h, SPEC, STRATEGY, "block", 0, 20, keyed_source(key, "block", 1))
    assert not pl.read_parquet(a.path)["value"].equals(pl.read_parquet(c.path)["value"])


def test_bad_requests(tmp_path: Path):
    h = SparseHistogram.from_dense("block", _blocks(10))
    with pytest.raises(MeasurementError, match="bad unit range"):
        measure_shard(tmp_path / "x.parquet", h, SPEC, STRATEGY, "block", 5, 11, seeded_source(1))
    units = SparseHistogram.from_dense("block", np.ones((3, 2), dtype=np.int64))
    with pytest.raises(MeasurementError, match="cells"):
        measure_shard(tmp_path / "y.parquet", units, SPEC, STRATEGY, "block", 0, 3, seeded_source(1))
    with pytest.raises(MeasurementError, match="parent_of"):
        measure_shard(tmp_path / "z.parquet", h, SPEC, STRATEGY, "block", 0, 10, seeded_source(1),
                      parent=h, parent_of=np.zeros(3, dtype=np.int64))
    with pytest.raises(MeasurementError, match="needs parent_of"):
        measure_shard(tmp_path / "z.parquet", h, SPEC, STRATEGY, "block", 0, 10, seeded_source(1), parent=h)
    good = measure_shard(tmp_path / "g.parquet", h, SPEC, STRATEGY, "block", 0, 10, seeded_source(1))
    with pytest.raises(MeasurementError, match="no measurements"):
        load_measurements(good.path, SPEC, 0, 10, queries=["detailed", "total", "hhgq*hispanic"])
    assert list(load_measurements(good.path, SPEC, 0, 10, queries=["total", "detailed"])) == ["total", "detailed"]
    other = tmp_path / "other.parquet"
    pl.DataFrame({c: [] for c in COLUMNS}).write_parquet(other)
    with pytest.raises(MeasurementError, match="not a measurement file"):
        load_measurements(other, SPEC, 0, 10)


def test_fully_skipped_queries_are_still_returned(tmp_path: Path):
    # every parent is empty: nothing is drawn, yet the loader returns each query, all NaN,
    # with its exact variance (post-processing needs the variances, not the rows)
    h = SparseHistogram.from_dense("block", np.zeros((6, SPEC.n_cells), dtype=np.int64))
    parent = SparseHistogram.from_dense("block_group", np.zeros((2, SPEC.n_cells), dtype=np.int64))
    res = measure_shard(tmp_path / "e.parquet", h, SPEC, STRATEGY, "block", 0, 6, seeded_source(1),
                        parent=parent, parent_of=np.repeat([0, 1], 3))
    assert res.rows == 0
    m = load_measurements(res.path, SPEC, 0, 6)
    assert list(m) == list(STRATEGY.queries("block"))
    assert all(np.isnan(v.values).all() for v in m.values())
    assert m["detailed"].variance == discrete_gaussian_variance(STRATEGY.sigma2("block", "detailed"))


def test_units_measurements(tmp_path: Path):
    spec = load_spec("units")
    strat = load_strategy("census2020_units")
    occ = np.array([[3, 10], [0, 0], [1, 7]])
    h = SparseHistogram.from_dense("tract", occ)
    res = measure_shard(tmp_path / "u.parquet", h, spec, strat, "tract", 0, 3, seeded_source(9), full=True)
    m = load_measurements(res.path, spec, 0, 3)
    assert list(m) == ["detailed"] and m["detailed"].values.shape == (3, 2)
    assert m["detailed"].sigma2 == 1 / (strat.rho * Fraction(1456, 4100))


def test_loader_does_not_depend_on_the_file_layout(tmp_path: Path):
    # the loader reads only row groups whose unit statistics overlap the range and takes a
    # group's query from its statistics; the same rows written shuffled, with every query mixed
    # in small row groups and split over two files, must load to the same matrices for any range
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, skipped = _files(tmp_path, seed=7, split=25, keys=(3, 4))
    assert 0 < pq.read_metadata(skipped).num_rows < sum(pq.read_metadata(p).num_rows for p in paths)
    for originals in ([*paths], [skipped]):
        mixed, bare = [], []
        for k, p in enumerate(originals):
            t = pq.read_table(p).replace_schema_metadata(pq.read_schema(p).metadata)
            order = np.random.default_rng(k).permutation(t.num_rows)
            out = tmp_path / f"mixed-{p.stem}.parquet"
            pq.write_table(t.take(pa.array(order)), out, row_group_size=997)
            mixed.append(out)
            # as written, but without any row-group statistics: nothing may be skipped on them
            out = tmp_path / f"bare-{p.stem}.parquet"
            pq.write_table(t, out, row_group_size=5000, write_statistics=False)
            bare.append(out)
        rows = pl.concat([pl.read_parquet(p) for p in originals])
        for lo, hi in [(0, 40), (3, 29), (24, 26), (25, 26), (39, 40), (10, 10)]:
            a = load_measurements(originals, SPEC, lo, hi)
            b = load_measurements(mixed, SPEC, lo, hi)
            c = load_measurements(bare, SPEC, lo, hi)
            assert list(a) == list(b) == list(c) == list(STRATEGY.queries("block"))
            for q in a:
                want = _from_rows(rows, q, lo, hi)  # built here, independently
                assert np.array_equal(a[q].values, want, equal_nan=True), (q, lo, hi)
                assert np.array_equal(b[q].values, want, equal_nan=True), (q, lo, hi)
                assert np.array_equal(c[q].values, want, equal_nan=True), (q, lo, hi)
        if originals == paths:  # every answer present: no NaN, and equal to the whole-range load
            whole = load_measurements(paths, SPEC, 0, 40)
            part = load_measurements(paths, SPEC, 3, 29)
            for q in whole:
                assert not np.isnan(whole[q].values).any()
                assert np.array_equal(whole[q].values[3:29], part[q].values)


def test_loader_fills_in_place_until_the_draw_order_breaks(tmp_path: Path):
    # a complete file in draw order is copied into place row group by row group; rows missing or
    # repeated after some complete row groups (the order breaks mid-range) must still load to
    # exactly the matrix built from the rows, with NaN where no row is and the last row winning
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = SparseHistogram.from_dense("block", _blocks(30, seed=11))
    full = measure_shard(tmp_path / "m.parquet", h, SPEC, STRATEGY, "block", 0, 30, seeded_source(5), full=True).path
    t = pq.read_table(full).replace_schema_metadata(pq.read_schema(full).metadata)
    rng = np.random.default_rng(0)
    for case in range(6):
        keep = np.ones(t.num_rows, bool)
        cut = int(rng.integers(t.num_rows // 3, t.num_rows))  # rows before the cut stay complete
        keep[cut:] = rng.random(t.num_rows - cut) > 0.05
        order = np.flatnonzero(keep)
        if case % 2:  # a row repeated with another value after its first copy
            extra = t.take(pa.array([order[-1]])).set_column(3, "value", pa.array([10**6], pa.int64()))
            rows = pa.concat_tables([t.take(pa.array(order)), extra.cast(t.schema)])
        else:
            rows = t.take(pa.array(order))
        out = tmp_path / f"holed-{case}.parquet"
        pq.write_table(rows, out, row_group_size=int(rng.integers(500, 5000)))
        df = pl.from_arrow(rows)
        for lo, hi in [(0, 30), (7, 23)]:
            got = load_measurements(out, SPEC, lo, hi)
            for q, m in got.items():
                assert np.array_equal(m.values, _from_rows(df, q, lo, hi), equal_nan=True), (case, q, lo, hi)


def test_complete_queries_are_read_from_their_values_alone(tmp_path: Path, monkeypatch):
    # measure_shard records its layout (rows per query, row-group sizes); a query holding every
    # answer of the file's units is then read from its value column alone, row r being unit
    # u0 + r // n_answers, answer r % n_answers. Small row groups and noise batches so that a
    # query spans several of each; the result must equal the matrix built from the rows, for
    # ranges inside, across and outside the files, and no row group may be read row by row
    import json

    import pyarrow.parquet as pq

    from pipeline.privacy import measure

    monkeypatch.setattr(measure, "ROW_GROUP_ROWS", 1000)
    monkeypatch.setattr(measure, "BATCH_ANSWERS", 5000)
    paths, skipped = _files(tmp_path, seed=13, split=17, keys=(8, 9))
    for p in [*paths, skipped]:
        md = pq.read_metadata(p)
        layout = json.loads(md.metadata[measure.LAYOUT_KEY])
        assert layout["row_groups"] == [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        assert [q for q, _ in layout["queries"]] == list(STRATEGY.queries("block"))
        assert sum(r for _, r in layout["queries"]) == md.num_rows
        assert md.num_row_groups > len(layout["queries"])  # queries span several groups
    row_by_row: list[str] = []
    read_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, columns=None, **kw: (row_by_row.append(str(columns)),
                                                             read_group(self, g, columns=columns, **kw))[1])
    for files in (paths, [skipped]):
        rows = pl.concat([pl.read_parquet(p) for p in files])
        for lo, hi in [(0, 40), (3, 29), (16, 18), (17, 40), (39, 40), (10, 10)]:
            row_by_row.clear()
            got = load_measurements(files, SPEC, lo, hi)
            for q, m in got.items():
                assert np.array_equal(m.values, _from_rows(rows, q, lo, hi), equal_nan=True), (q, lo, hi)
            if files is paths:
                assert row_by_row == []  # every query complete: values only
            elif hi > lo:  # the skipped detailed answers are read row by row
                assert row_by_row


def test_summed_loads_are_the_sums_of_the_units_matrices(tmp_path: Path, monkeypatch):
    # ``sum_by``: each group's (consecutive units) answers summed as the rows stream by, the
    # runs split inside units (small row groups and noise batches), read from the values alone
    # or row by row (a copy without statistics): exactly the sums of the units' matrix rows,
    # empty groups 0; a file with answers skipped cannot be summed (the full estimator's leaves)
    import pyarrow.parquet as pq

    from pipeline.privacy import measure

    monkeypatch.setattr(measure, "ROW_GROUP_ROWS", 1000)
    monkeypatch.setattr(measure, "BATCH_ANSWERS", 5000)
    paths, skipped = _files(tmp_path, seed=17, split=17, keys=(1, 2))
    bare = []
    for p in paths:
        out = tmp_path / f"bare-{p.stem}.parquet"
        pq.write_table(pq.read_table(p).replace_schema_metadata(pq.read_schema(p).metadata), out,
                       row_group_size=777, write_statistics=False)
        bare.append(out)
    rng = np.random.default_rng(3)
    for lo, hi in [(0, 40), (3, 29), (17, 40), (16, 18)]:
        n = hi - lo
        dense = load_measurements(paths, SPEC, lo, hi)
        for starts in ([0], [0, 1, 1, min(5, n)], [0, *sorted(rng.integers(0, n, 4).tolist())]):
            ends = [*starts[1:], n]
            for files in (paths, bare):
                got = load_measurements(files, SPEC, lo, hi, sum_by=np.array(starts))
                for q, m in got.items():
                    want = np.stack([dense[q].values[a:b].sum(axis=0) for a, b in zip(starts, ends)])
                    assert np.array_equal(m.values, want), (q, lo, hi, starts)
    with pytest.raises(MeasurementError, match="not measured|draw order"):
        load_measurements([skipped], SPEC, 0, 40, sum_by=np.array([0, 10, 20, 30]))
    with pytest.raises(MeasurementError, match="sum_by"):
        load_measurements(paths, SPEC, 0, 40, sum_by=np.array([0, 30, 20]))


def test_true_answers_of_every_query_are_the_sums_of_their_cells():
    # the detailed query's answers are put in place (each cell its own answer), the others summed:
    # both must equal the dense tabulation x @ Q for any rows of a histogram
    from pipeline.privacy.measure import _answers

    for seed in range(5):
        x = _blocks(37, seed=seed)
        h = SparseHistogram.from_dense("block", x)
        for qname in STRATEGY.queries("block"):
            q = SPEC.query(qname)
            for lo, hi in [(0, 37), (5, 30), (36, 37)]:
                a, b = np.searchsorted(h.unit, [lo, hi])
                got = _answers(h.unit[a:b], h.cell[a:b], h.count[a:b], lo, hi - lo, q.cell_to_answer, q.n_answers)
                want = np.zeros((hi - lo, q.n_answers), np.int64)
                np.add.at(want.T, q.cell_to_answer, x[lo:hi].T)
                assert got.dtype == np.int64 and np.array_equal(got, want), (qname, lo, hi)
