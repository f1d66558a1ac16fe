"""The full-information estimator end to end (``postprocess.estimator: full``): every answer
measured, the hierarchical GLS over all levels, the same constrained engine, and a release that
names its estimator, carries per-unit margins of error and unbiased tables that add up, and
verifies; the same noise draws as a ``topdown`` run with ``privacy.full_measurements``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from run_helpers import make_inputs, write_config

from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.model.histogram import SparseHistogram
from pipeline.release.verify import verify_release


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    inputs = make_inputs(tmp, persons=4000, seed=3)
    full = stages.run(write_config(tmp, inputs, "full.yaml", release_id="full-1",
                                   postprocess={"estimator": "full"}), progress=False)
    top = stages.run(write_config(tmp, inputs, "top.yaml", release_id="top-1",
                                  privacy={"full_measurements": True}, postprocess={"estimator": "topdown"}),
                     progress=False)
    return tmp, inputs, full, top


def test_release_names_estimator_and_verifies(two_runs) -> None:
    _, _, full, top = two_runs
    for out, name in ((full, "full"), (top, "topdown")):
        release = Path(out["release_path"])
        manifest = json.loads((release / "manifest.json").read_text())
        assert manifest["estimator"]["name"] == name
        assert manifest["contents"]["unbiased"] is (name == "full")
        assert verify_release(release) == []  # the margins, recomputed in memory, are the ones written
        # nothing of the writing is left beside it (the full estimator's margins waited in files)
        assert not [p.name for p in release.parent.iterdir() if p.name.startswith(".")]


def test_same_noise_draws_as_topdown_with_full_measurements(two_runs) -> None:
    _, _, full, top = two_runs
    a, b = RunContext.load(full["run_dir"]), RunContext.load(top["run_dir"])
    for kind in a.kinds:
        for lv in a.level_names:
            fa = sorted(a.rd.measurement_dir(kind, lv).glob("shard-*.parquet"))
            fb = sorted(b.rd.measurement_dir(kind, lv).glob("shard-*.parquet"))
            assert [p.name for p in fa] == [p.name for p in fb]
            for pa, pb in zip(fa, fb):
                assert pl.read_parquet(pa).equals(pl.read_parquet(pb)), f"{kind} {lv} {pa.name}"


def test_published_counts_consistent_nonnegative_and_invariants_exact(two_runs) -> None:
    _, inputs, full, _ = two_runs
    ctx = RunContext.load(full["run_dir"])
    persons = pl.read_parquet(inputs / "persons.parquet")
    for kind in ctx.kinds:
        hists = {lv: SparseHistogram.from_parquet(ctx.rd.solved_path(kind, lv)).dense() for lv in ctx.level_names}
        for i, lv in enumerate(ctx.level_names[1:], start=1):
            summed = np.zeros_like(hists[ctx.level_names[i - 1]])
            np.add.at(summed, ctx.geography.level(lv).parent, hists[lv])
            assert np.array_equal(summed, hists[ctx.level_names[i - 1]])
            assert (hists[lv] >= 0).all()
    assert SparseHistogram.from_parquet(ctx.rd.solved_path("persons", "nation")).total() == persons.height


def test_margins_are_per_unit_and_exact_lines_get_zero(two_runs) -> None:
    _, _, full, _ = two_runs
    release = Path(full["release_path"])
    p1 = pl.read_parquet(release / "tables" / "P1.parquet")
    state_total = p1.filter((pl.col("geolevel") == "state") & (pl.col("line") == 1))
    assert (state_total["moe90"] == 0).all()  # invariant
    tract = p1.filter((pl.col("geolevel") == "tract") & (pl.col("line") == 3))["moe90"].to_numpy()
    assert (tract > 0).all() and np.unique(tract).size > 1  # per unit: tracts differ in shape
    block = p1.filter((pl.col("geolevel") == "block") & (pl.col("line") == 3))["moe90"].to_numpy()
    assert (block > 0).all()
    p5 = pl.read_parquet(release / "tables" / "P5.parquet")
    assert p5["moe90"].null_count() == 0


def test_unbiased_tables_add_up_and_match_standard_errors(two_runs) -> None:
    _, _, full, _ = two_runs
    release = Path(full["release_path"])
    u = pl.read_parquet(release / "tables" / "unbiased" / "P1.parquet")
    assert set(u["geolevel"].unique()) == {"nation", "state", "county", "tract", "block_group"}
    line1 = u.filter(pl.col("line") == 1)
    by_level = dict(line1.group_by("geolevel").agg(pl.col("estimate").sum()).iter_rows())
    for lv in ("state", "county", "tract", "block_group"):
        assert by_level[lv] == pytest.approx(by_level["nation"], abs=1e-6)
    p1 = pl.read_parquet(release / "tables" / "P1.parquet").filter(pl.col("geolevel") != "block")
    joined = u.join(p1, on=["geoid", "geolevel", "line"])
    assert np.allclose(joined["se"] * 1.645, joined["moe90"], atol=0.006)


def test_tampered_unbiased_estimate_is_caught(two_runs, tmp_path) -> None:
    import shutil

    _, _, full, _ = two_runs
    copy = tmp_path / "rel"
    shutil.copytree(full["release_path"], copy)
    path = copy / "tables" / "unbiased" / "P2.parquet"
    df = pl.read_parquet(path)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(pl.col("estimate") + 3.0)
                         .otherwise(pl.col("estimate")).alias("estimate"))
    df.write_parquet(path)
    problems = verify_release(copy)
    assert any(p.check == "unbiased" for p in problems)
    assert any(p.check == "checksum" or "sha256" in str(p) for p in problems)


def test_a_part_reads_no_measurement_file_changed_since_it_was_drawn(two_runs, tmp_path) -> None:
    """Each part of the estimate stage checks the measurement files of its subtree against the
    run's record before reading them: one noisy value changed stops the part."""
    import shutil

    from pipeline.job import estimate
    from pipeline.job.rundir import RunDirIntegrityError
    from pipeline.postprocess.gls import split_parts

    _, _, full, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(full["run_dir"], run)
    ctx = RunContext.load(run)
    levels = ctx.geography.levels
    k, ranges = split_parts([lv.child_ptr if i + 1 < len(levels) else None for i, lv in enumerate(levels)],
                            [int(lv.n_units) for lv in levels], 2)
    lo, hi = ranges[0]
    assert estimate._part_up((str(run), "persons", k, lo, hi, 0))  # as drawn: read
    shard = sorted(ctx.rd.measurement_dir("persons", levels[-1].name).glob("shard-*.parquet"))[0]
    rows = pl.read_parquet(shard)
    rows.with_columns(pl.col("value") + (pl.int_range(pl.len()) == 0).cast(pl.Int64)).write_parquet(shard)
    with pytest.raises(RunDirIntegrityError, match="changed since its stage finished"):
        estimate._part_up((str(run), "persons", k, lo, hi, 0))


def test_level_steps_reuse_the_measurements_without_reading_the_confidential_histograms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure step draws every shard of every level; the level steps then reuse those files
    and read no confidential histogram a second time: each shard's truth is read once, by its draw."""
    from pipeline.job import shard

    calls: list[tuple[str, str, Any]] = []
    real = shard.truth_histogram

    def spy(ctx: RunContext, kind: str, level: str, units: Any = None) -> SparseHistogram:
        calls.append((kind, level, units))
        return real(ctx, kind, level, units)

    monkeypatch.setattr(shard, "truth_histogram", spy)
    inputs = make_inputs(tmp_path, persons=1500, seed=5)
    out = stages.run(write_config(tmp_path, inputs, release_id="once", postprocess={"estimator": "full"}),
                     progress=False)
    ctx = RunContext.load(out["run_dir"])
    drawn = [(k, lv) for k in ctx.kinds for lv in ctx.level_names
             for _ in ctx.rd.measurement_dir(k, lv).glob("shard-*.parquet")]
    assert sorted((k, lv) for k, lv, _ in calls) == sorted(drawn)
    assert len(set(calls)) == len(calls)


def test_split_parts_by_hand() -> None:
    """Root -> 2 states -> 5 counties (3 + 2) -> 10 blocks (4, 1, 1, 2, 2)."""
    from pipeline.postprocess.gls import split_parts

    ptrs = [np.array([0, 2]), np.array([0, 3, 5]), np.array([0, 4, 5, 6, 8, 10]), None]
    units = [1, 2, 5, 10]
    # two parts: the states (6 and 4 blocks)
    assert split_parts(ptrs, units, 2) == (1, [(0, 1), (1, 2)])
    # four: the counties, grouped up to 10 // 4 = 2 blocks (the first county, 4 blocks, alone)
    assert split_parts(ptrs, units, 4) == (2, [(0, 1), (1, 3), (3, 4), (4, 5)])
    # more parts than any level above the bottom has units: the blocks, one a part
    assert split_parts(ptrs, units, 20) == (3, [(b, b + 1) for b in range(10)])
    # one county of 7 of 11 blocks (more than twice a quarter): not the counties but the blocks,
    # grouped two by two (11 // 4)
    big = [np.array([0, 2]), np.array([0, 3, 5]), np.array([0, 7, 8, 9, 10, 11]), None]
    assert split_parts(big, [1, 2, 5, 11], 4) == (3, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 11)])
    # ... or, no deeper than the counties, the counties grouped up to 2 blocks (the margins' cut)
    assert split_parts(big, [1, 2, 5, 11], 4, deepest=2) == (2, [(0, 1), (1, 3), (3, 5)])
    # with two parts a state of 9 blocks is within twice the share (2 * 5): the states
    assert split_parts(big, [1, 2, 5, 11], 2) == (1, [(0, 1), (1, 2)])
    # and a county within twice the share is kept: 3 parts of 11 (goal 3, a county of 6 <= 6)
    even = [np.array([0, 2]), np.array([0, 3, 5]), np.array([0, 6, 7, 8, 9, 11]), None]
    assert split_parts(even, [1, 2, 5, 11], 3) == (2, [(0, 1), (1, 4), (4, 5)])
    # a county of 7 blocks allowed (largest=7): the counties, the large one a part of its own
    assert split_parts(big, [1, 2, 5, 11], 4, largest=7) == (2, [(0, 1), (1, 3), (3, 5)])
    assert split_parts(big, [1, 2, 5, 11], 4, largest=6)[0] == 3


def test_a_large_tree_is_cut_at_its_counties_despite_a_large_city(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate stage's cut of a tree with many parts (the US-shaped one asks 141): the
    counties, one much larger than twice a part (the synthetic Los Angeles: 155,010 blocks, ~3.9
    parts) a part of its own — not the tracts, whose ~26 times as many units the driver would
    fit above the split level — unless that county is over the size limit, or holds more than
    an eighth of the tree (the work could not be shared)."""
    from types import SimpleNamespace

    from pipeline.job import estimate

    def tree(big_tracts: int) -> list[SimpleNamespace]:
        """root -> 2 states of 100 counties -> tracts (county 0: ``big_tracts``, the others 2)
        -> 5 blocks a tract"""
        tracts = np.array([big_tracts] + [2] * 199)
        ptrs = [np.array([0, 2]), np.array([0, 100, 200]), np.concatenate([[0], np.cumsum(tracts)]),
                np.arange(0, 5 * tracts.sum() + 1, 5), None]
        sizes = [1, 2, 200, int(tracts.sum()), 5 * int(tracts.sum())]
        return [SimpleNamespace(child_ptr=p, n_units=n) for p, n in zip(ptrs, sizes)]

    monkeypatch.setattr(estimate, "ESTIMATE_PART_UNITS", 20)  # 2,050 blocks: 103 parts of 19 (2 counties)
    monkeypatch.setattr(estimate, "ESTIMATE_LARGEST_UNIT", 100)
    levels = tree(12)  # county 0: 60 blocks, over twice a part (38)
    assert estimate.estimate_parts(2050) == 103
    k, ranges = estimate.estimate_split(levels)
    assert k == 2 and ranges[:3] == [(0, 1), (1, 3), (3, 5)] and ranges[-1][1] == 200
    monkeypatch.setattr(estimate, "ESTIMATE_LARGEST_UNIT", 50)  # over the limit: the tracts
    assert estimate.estimate_split(levels)[0] == 3
    monkeypatch.setattr(estimate, "ESTIMATE_LARGEST_UNIT", 10**9)
    assert estimate.estimate_split(levels)[0] == 2
    # a county of 1,000 of 2,990 blocks: more than an eighth of the tree (2 * 2990 // 16 = 372)
    assert estimate.estimate_split(tree(200))[0] == 3


def _whole_tree_fit(ctx: RunContext) -> tuple[Any, Any]:
    """One GLS fit over the whole tree of a run's persons measurements: ``(up pass, fit)``."""
    from pipeline.postprocess.gls import GLSModel, LevelMeasurements
    from pipeline.privacy.measure import load_measurements

    spec, strategy, levels = ctx.spec("persons"), ctx.strategies["persons"], ctx.geography.levels
    data = []
    for i, lv in enumerate(levels):
        meas = load_measurements(ctx.rd.measurement_files("persons", lv.name), spec, 0, lv.n_units,
                                 queries=list(strategy.queries(lv.name)))
        data.append(LevelMeasurements(None if i == 0 else levels[i - 1].child_ptr,
                                      {q: (m.values, m.variance) for q, m in meas.items()}))
    model = GLSModel(spec, [q for d in data for q in d.measured])
    up = model.upward(data)
    return up, model.downward(up)


def test_streaming_by_state_equals_the_whole_tree_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate stage fits the tree in parts below a split level, in a pool of workers; its
    targets and line estimates are those of one fit over the whole tree (two states), bitwise the
    same with one worker or two, and so is the release. Two parts instead of sixteen, so that
    this small tree is cut at its states and every part's up pass spans five levels."""
    from pipeline.job import estimate

    monkeypatch.setattr(estimate, "ESTIMATE_PARTS", 2)
    from test_dask_executor import _digests, _two_states

    from pipeline.job.estimate import LineEstimates, read_targets
    from pipeline.release.tables import load_tables

    inputs = _two_states(tmp_path)
    out = stages.run(write_config(tmp_path, inputs, release_id="two", postprocess={"estimator": "full"},
                                  execution={"workers": 1, "shard_target_cells": 20_000}), progress=False)
    ctx = RunContext.load(out["run_dir"])
    spec, strategy, levels = ctx.spec("persons"), ctx.strategies["persons"], ctx.geography.levels
    assert levels[1].n_units == 2
    k, _ = estimate.estimate_split(levels)
    assert 0 < k < len(levels) - 2  # every part holds levels with targets above its leaves
    up, whole = _whole_tree_fit(ctx)
    lines = dict(LineEstimates(ctx, ["persons"]))
    for i, lv in enumerate(levels[:-1]):
        sub = whole.levels[0] if i == 0 else up.subtree(i)
        got, _ = read_targets(ctx.rd.estimate_targets_path("persons", lv.name), spec, 0, lv.n_units,
                              strategy.queries(lv.name))
        for q in strategy.queries(lv.name):
            np.testing.assert_allclose(got[q], sub.query(q), rtol=1e-9, atol=1e-8)
        if lv.n_units > 1:  # a shard's unit range: exactly those units' rows of every query
            part, _ = read_targets(ctx.rd.estimate_targets_path("persons", lv.name), spec, 1, lv.n_units,
                                   strategy.queries(lv.name))
            assert all(np.array_equal(part[q], got[q][1:]) for q in strategy.queries(lv.name))
        for t in load_tables("pl94").of_kind("persons"):
            want = np.asarray((t.matrix.astype(np.float64) @ whole.levels[i].estimate.T).T)
            np.testing.assert_allclose(lines[(t.name, lv.name)], want, rtol=1e-9, atol=1e-8)
    assert verify_release(Path(out["release_path"])) == []
    (tmp_path / "w2").mkdir()
    two = stages.run(write_config(tmp_path / "w2", inputs, release_id="two", postprocess={"estimator": "full"},
                                  execution={"workers": 2, "shard_target_cells": 20_000}), progress=False)
    ctx2 = RunContext.load(two["run_dir"])
    for lv in levels[:-1]:
        for path in (ctx.rd.estimate_targets_path, ctx.rd.estimate_lines_path):
            a = pl.read_parquet(path("persons", lv.name))
            b = pl.read_parquet(getattr(ctx2.rd, path.__name__)("persons", lv.name))
            assert a.equals(b), (path.__name__, lv.name)
    assert not ctx2.rd.estimate_parts_dir("persons").exists()
    assert _digests(Path(out["release_path"])) == _digests(Path(two["release_path"]))


def test_simulated_margins_get_the_bottom_level_lines_of_the_whole_tree_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With simulated margins the estimate stage also writes the bottom level's line estimates
    (the margins measure the published counts' bias against them): those of one fit over the
    whole tree, whether the parts are cut above the bottom (2 parts: at the states) or are
    bottom units themselves (the stage again with a part per block, as a large tree's parts of
    at most ``ESTIMATE_PART_UNITS`` blocks are counted); the other levels' files are those of a
    run with design margins."""
    from pipeline.job import estimate

    monkeypatch.setattr(estimate, "ESTIMATE_PARTS", 2)
    from test_dask_executor import _two_states

    from pipeline.job.estimate import LineEstimates
    from pipeline.job.executor import Executor
    from pipeline.release.tables import load_tables

    inputs = _two_states(tmp_path)
    cfg = dict(release_id="two", postprocess={"estimator": "full"}, execution={"workers": 1, "shard_target_cells": 20_000})
    out = stages.run(write_config(tmp_path, inputs, output={"margins": "simulated", "margin_trials": 2}, **cfg),
                     progress=False)
    ctx = RunContext.load(out["run_dir"])
    levels = ctx.geography.levels
    _, whole = _whole_tree_fit(ctx)
    assert verify_release(Path(out["release_path"])) == []
    (tmp_path / "d").mkdir()
    design = RunContext.load(stages.run(write_config(tmp_path / "d", inputs, **cfg), progress=False)["run_dir"])
    assert not design.rd.estimate_lines_path("persons", levels[-1].name).exists()
    for lv in levels[:-1]:
        for path in (ctx.rd.estimate_targets_path, ctx.rd.estimate_lines_path):
            a = pl.read_parquet(path("persons", lv.name))
            assert a.equals(pl.read_parquet(getattr(design.rd, path.__name__)("persons", lv.name))), lv.name
    for part_units in (10**9, 1):  # at least 2 parts; then a part per block (a large tree's rule)
        monkeypatch.setattr(estimate, "ESTIMATE_PART_UNITS", part_units)
        parts = estimate.estimate_parts(int(levels[-1].n_units))
        assert parts == (2 if part_units > 1 else levels[-1].n_units)
        k, _ = estimate.estimate_split(levels)
        assert (k == len(levels) - 1) == (part_units == 1)
        if part_units == 1:  # the stage again, cut at the bottom, over the same measurements
            weights = {lv.name: pq.read_schema(ctx.rd.estimate_targets_path("persons", lv.name)).metadata
                       for lv in levels[:-1]}
            _, files = estimate.estimate_kind(ctx, "persons", Executor(1))
            # the engine's weights, fitted to each level's exact information sum: the same bits
            # whatever the cut (test_postprocess_gls: the sum over any parts is the level's)
            assert weights == {lv.name: pq.read_schema(ctx.rd.estimate_targets_path("persons", lv.name)).metadata
                               for lv in levels[:-1]}
            ctx.rd.mark_done("estimate:persons", ctx.rd.done_info("estimate:persons") or {}, files=files)
        lines = dict(LineEstimates(ctx, ["persons"], bottom=True))
        for i, lv in enumerate(levels):
            for t in load_tables("pl94").of_kind("persons"):
                want = np.asarray((t.matrix.astype(np.float64) @ whole.levels[i].estimate.T).T)
                np.testing.assert_allclose(lines[(t.name, lv.name)], want, rtol=1e-9, atol=1e-8)


def test_unbiased_tables_are_written_and_checked_a_few_units_at_a_time(two_runs, monkeypatch) -> None:
    """The unbiased tables are streamed (a national block-group level is ~17 M rows of text per
    table): written and checked a few units at a time they hold the same rows, and a changed
    standard error in a later piece of a level is still caught by the check that regenerates
    the rows (an estimate is checked by the sums, a standard error only there)."""
    from pipeline.release import unbiased

    tmp, inputs, full, _ = two_runs
    monkeypatch.setattr(unbiased, "_chunk_units", lambda table: 3)
    again = stages.run(write_config(tmp, inputs, "full2.yaml", release_id="full-2",
                                    postprocess={"estimator": "full"}), progress=False)
    one, chunked = (Path(r["release_path"]) / "tables" / "unbiased" for r in (full, again))
    for name in ("P1", "P2", "P3", "P4", "H1"):
        assert pl.read_parquet(chunked / f"{name}.parquet").equals(pl.read_parquet(one / f"{name}.parquet"))
    assert verify_release(Path(again["release_path"])) == []
    path = chunked / "P4.parquet"
    df = pl.read_parquet(path)
    late = df.height - 10  # in the last level's last pieces
    df.with_columns(pl.when(pl.int_range(pl.len()) == late).then(pl.col("se") + 1.0)
                    .otherwise(pl.col("se")).alias("se")).write_parquet(path)
    problems = verify_release(Path(again["release_path"]))
    assert any(p.check == "unbiased" and "differ" in str(p) for p in problems), problems


def test_a_release_that_fails_after_its_margins_were_written_leaves_no_files_behind(two_runs, monkeypatch) -> None:
    """The full estimator's margins wait in files beside the folder being written: a failure
    while publishing (here in the unbiased tables, after the count tables read them) removes
    them with the folder, and nothing of the attempt is left in the releases directory."""
    from pipeline.release import unbiased

    tmp, inputs, full, _ = two_runs

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(unbiased, "write_unbiased", broken)
    releases = Path(full["release_path"]).parent
    before = sorted(p.name for p in releases.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        stages.run(write_config(tmp, inputs, "full3.yaml", release_id="full-3", postprocess={"estimator": "full"}),
                   progress=False)
    assert sorted(p.name for p in releases.iterdir()) == before


def test_verify_reads_the_margins_from_a_scratch_folder_and_removes_it(two_runs, tmp_path, monkeypatch) -> None:
    """``dptab verify`` recomputes the full estimator's margins once for the count and the
    unbiased tables, keeps them in a scratch folder outside the release (read a range of units at
    a time, as the writer does) and removes it: the release verifies clean, and in a copy a
    published moe90 changed in one tract row is still found."""
    import shutil
    import tempfile

    from pipeline.release import manifest as release_manifest
    from pipeline.release.uncertainty import DiskRows, RepeatedRows

    _, _, full, _ = two_runs
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where verify's scratch folders go
    calls: list[Any] = []
    real = release_manifest.release_margins

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append((kwargs.get("spill"), out))
        return out

    monkeypatch.setattr(release_manifest, "release_margins", spy)
    release = Path(full["release_path"])
    rid = json.loads((release / "manifest.json").read_text())["release_id"]
    assert verify_release(release, release_id=rid) == []
    assert len(calls) == 1  # once for both the count and the unbiased tables' rows
    spill, moe = calls[0]
    assert spill is not None and spill.parent == scratch
    per_unit = [v for v in moe.values() if getattr(v, "ndim", 1) == 2]
    assert per_unit and all(isinstance(v, (DiskRows, RepeatedRows)) for v in per_unit)
    assert list(scratch.iterdir()) == []  # the margins' (and the explorer's) scratch removed

    copy = tmp_path / rid
    shutil.copytree(release, copy)
    path = copy / "tables" / "P1.parquet"
    df = pl.read_parquet(path)
    tract = df.with_row_index("i").filter((pl.col("geolevel") == "tract") & (pl.col("moe90") > 0))["i"][3]
    df.with_columns(pl.when(pl.int_range(pl.len()) == tract).then(pl.col("moe90") + 0.01)
                    .otherwise(pl.col("moe90")).alias("moe90")).write_parquet(path)
    problems = verify_release(copy)
    assert any(p.check == "table_rows" and "moe90" in str(p) and p.geolevel == "tract" for p in problems), problems
    assert list(scratch.iterdir()) == []


def test_targets_of_a_unit_range_and_a_missing_one(two_runs, tmp_path) -> None:
    """A shard's targets are its units' rows of the level's targets file, however the file's row
    groups cut them (here one row group every 7 rows); a file lacking one row of the range stops
    the shard with a clear error instead of leaving an uninitialised target."""
    import pyarrow as pa

    from pipeline.job.estimate import EstimateError, read_targets

    _, _, full, _ = two_runs
    ctx = RunContext.load(full["run_dir"])
    spec, lv = ctx.spec("persons"), ctx.geography.levels[-2]
    queries = ctx.strategies["persons"].queries(lv.name)
    path = ctx.rd.estimate_targets_path("persons", lv.name)
    whole, weights = read_targets(path, spec, 0, lv.n_units, queries)
    rows = pq.read_table(path)
    small = tmp_path / "targets.parquet"
    pq.write_table(rows, small, row_group_size=7)
    a, b = 1, lv.n_units - 1
    part, again = read_targets(small, spec, a, b, queries)
    assert again == weights
    for q in queries:
        np.testing.assert_array_equal(part[q], whole[q][a:b])
    unit = rows.column("unit").to_numpy()
    drop = int(np.flatnonzero(unit == a)[0])
    pq.write_table(pa.concat_tables([rows.slice(0, drop), rows.slice(drop + 1)]), small, row_group_size=7)
    with pytest.raises(EstimateError, match="1 of .* are missing"):
        read_targets(small, spec, a, b, queries)
