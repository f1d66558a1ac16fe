"""End to end: `dptab run` on tiny synthetic data and on the real Perry County PPMF records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from run_helpers import make_inputs, write_config

from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.model.histogram import SparseHistogram
from pipeline.privacy.ledger import BudgetExceededError
from pipeline.release.manifest import ReleaseExistsError
from pipeline.release.verify import verify_release

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    inputs = make_inputs(tmp)
    cfg = write_config(tmp, inputs, release_id="rel-1")
    out = stages.run(cfg, progress=False)
    return tmp, inputs, cfg, out


def test_release_verifies_and_levels_are_consistent(finished_run) -> None:
    tmp, _, _, out = finished_run
    release = Path(out["release_path"])
    assert release.name == "rel-1" and (release / "index.html").is_file()
    assert verify_release(release) == []
    run_dir = Path(out["run_dir"])
    ctx = RunContext.load(run_dir)
    levels = ctx.level_names
    for kind in ("persons", "units"):
        hists = {lv: SparseHistogram.from_parquet(ctx.rd.solved_path(kind, lv)) for lv in levels}
        for i, lv in enumerate(levels[1:], start=1):
            child = hists[lv].dense()
            parent = hists[levels[i - 1]].dense()
            par = ctx.geography.level(lv).parent
            summed = np.zeros_like(parent)
            np.add.at(summed, par, child)
            assert np.array_equal(summed, parent), f"{kind} {lv} does not add up to its parent"
            assert (child >= 0).all()


def test_invariants_hold_exactly(finished_run) -> None:
    _, inputs, _, out = finished_run
    run_dir = Path(out["run_dir"])
    persons = pl.read_parquet(inputs / "persons.parquet")
    units = pl.read_parquet(inputs / "units.parquet")
    nation = SparseHistogram.from_parquet(run_dir / "solved" / "persons_nation.parquet")
    assert nation.total() == persons.height  # nation total invariant
    states = SparseHistogram.from_parquet(run_dir / "solved" / "persons_state.parquet").totals()
    true_states = persons.group_by(pl.col("geoid").str.slice(0, 2)).len().sort("geoid")["len"].to_numpy()
    assert np.array_equal(states, true_states)
    blocks = SparseHistogram.from_parquet(run_dir / "solved" / "units_block.parquet").dense()
    hu = (units.filter(pl.col("kind") == 0).group_by("geoid").len().sort("geoid"))
    ctx = RunContext.load(run_dir)
    geoids = ctx.geography.level("block").geoids
    hu_by_block = dict(zip(hu["geoid"].to_list(), hu["len"].to_list()))
    expected = np.array([hu_by_block.get(g, 0) for g in geoids])
    assert np.array_equal(blocks.sum(axis=1), expected)


def test_same_release_id_is_refused_before_reading_data(finished_run, tmp_path) -> None:
    tmp, inputs, _, _ = finished_run
    cfg = write_config(tmp, inputs, name="again.yaml", release_id="rel-1",
                       inputs={"persons": str(tmp_path / "absent.parquet"), "units": str(tmp_path / "absent2.parquet")})
    with pytest.raises(ReleaseExistsError, match="rel-1"):
        stages.prepare(cfg)


def test_overspending_run_is_refused_before_reading_data(tmp_path) -> None:
    # the inputs do not exist: a refusal that reads no data must come before any file error
    cfg = write_config(tmp_path, tmp_path / "nowhere", privacy={"lifetime_rho": "1"})
    with pytest.raises(BudgetExceededError) as err:
        stages.prepare(cfg)
    assert "1" in str(err.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_perry_county_ppmf_end_to_end(tmp_path) -> None:
    """The real PPMF-layout records of Perry County, AL through the whole job."""
    cfg = write_config(
        tmp_path, tmp_path, release_id="perry",
        inputs={"persons": str(ROOT / "data" / "perry_al_ppmf_persons.parquet"),
                "units": str(ROOT / "data" / "perry_al_units.parquet")})
    out = stages.run(cfg, progress=False)
    release = Path(out["release_path"])
    assert verify_release(release) == []
    p1 = pl.read_parquet(release / "tables" / "P1.parquet")
    county = p1.filter((pl.col("geolevel") == "county") & (pl.col("line") == 1))
    assert county["count"].to_list() == [10588]  # the state total invariant (one county)


def test_levels_merge_a_shard_at_a_time_and_each_shard_is_checked(tmp_path, monkeypatch) -> None:
    """``merge_level`` appends the shards one by one: the level's file is byte for byte the
    whole merged histogram's, and a shard whose children no longer add up to their parents, or
    that holds another shard's units, stops the run."""
    from pipeline.job.plan import shard_bounds
    from pipeline.job.shard import ConsistencyError, merge_level

    inputs = make_inputs(tmp_path, persons=10_000, seed=3)  # 7 block groups, 192 blocks
    # ~30 blocks a shard: a shard per block group or two at the block level
    cfg = write_config(tmp_path, inputs, execution={"workers": 1, "shard_target_cells": 60_000})
    out = stages.run(cfg, progress=False)
    ctx = RunContext.load(Path(out["run_dir"]))
    kind, level = "persons", "block"
    n = len(shard_bounds(ctx, level)) - 1
    assert n >= 3
    shards = [SparseHistogram.from_parquet(ctx.rd.solved_shard_path(kind, level, s)) for s in range(n)]
    whole = SparseHistogram(level, shards[0].n_units, shards[0].n_cells, *(np.concatenate([getattr(h, a) for h in shards])
                                                                          for a in ("unit", "cell", "count")))
    whole.to_parquet(tmp_path / "whole.parquet")
    assert ctx.rd.solved_path(kind, level).read_bytes() == (tmp_path / "whole.parquet").read_bytes()

    # tampered shard files (the run directory's checksums bypassed, to reach the merge's own checks)
    monkeypatch.setattr(type(ctx.rd), "verified", lambda self, p: Path(p))
    first = SparseHistogram.from_parquet(ctx.rd.solved_shard_path(kind, level, 1))
    moved = first.count.copy()
    moved[0] += 1  # one more person in a block: its block group's sum no longer matches
    SparseHistogram(level, first.n_units, first.n_cells, first.unit, first.cell, moved).to_parquet(
        ctx.rd.solved_shard_path(kind, level, 1))
    with pytest.raises(ConsistencyError, match="do not add up"):
        merge_level(ctx, kind, level, [{}] * n)
    # shard 1's entries also written as shard 2's: units outside shard 2's parents' children
    first.to_parquet(ctx.rd.solved_shard_path(kind, level, 1))
    first.to_parquet(ctx.rd.solved_shard_path(kind, level, 2))
    with pytest.raises(ConsistencyError, match="outside its parents"):
        merge_level(ctx, kind, level, [{}] * n)


def test_an_edited_measurement_shard_stops_the_release(tmp_path) -> None:
    """Publishing copies exactly the measurement files the measure stage recorded: a shard file
    changed afterwards (here one noisy value) stops the release before anything is public, and
    leaves no partial folder."""
    from pipeline.job.publish import publish_release
    from pipeline.job.rundir import RunDirIntegrityError

    inputs = make_inputs(tmp_path, persons=2000, seed=5)
    out = stages.run(write_config(tmp_path, inputs, release_id="rel-m"), progress=False)
    ctx = RunContext.load(Path(out["run_dir"]))
    release = Path(out["release_path"])
    shard = ctx.rd.measurement_path("persons", "county", 0)
    rows = pl.read_parquet(shard)
    rows.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.col("value") + 1).otherwise(pl.col("value"))
                      .alias("value")).write_parquet(shard)
    import shutil

    shutil.rmtree(release)
    with pytest.raises(RunDirIntegrityError, match="changed since its stage finished"):
        publish_release(ctx)
    assert not release.exists() and list(release.parent.iterdir()) == []
