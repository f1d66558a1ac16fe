"""`dptab run CONFIG --plan`: the work list a run will follow, sized before anything is reserved.

The plan's shards are the run's shards (one implementation of the shard bounds), its answer
counts are what the run draws (the full estimator draws every answer), and the budget line
follows the ledger; nothing is written or reserved by planning."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import polars as pl
import pytest
from run_helpers import make_inputs, write_config

from pipeline.job import stages
from pipeline.job.context import RunContext
from pipeline.job.plan import plan
from pipeline.job.sizing import plan_run

ROOT = Path(__file__).resolve().parent.parent


def test_plan_matches_the_run_it_sizes(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, persons=4000, seed=3)  # 3 block groups, 69 blocks
    # a small shard target: several shards per level below the state
    cfg = write_config(tmp_path, inputs, release_id="sized", execution={"workers": 1, "shard_target_cells": 4_000})
    before = plan_run(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ledger.sqlite").exists()
    assert before.budget_left == Fraction(100) and before.rho > 0 and before.persons == 4000
    out = stages.run(cfg, progress=False)
    ctx = RunContext.load(out["run_dir"])
    shards = {(s.kind, s.level): len(s.shards) for s in plan(ctx) if s.action == "solve"}
    assert {(s.kind, s.level): s.shards for s in before.steps} == shards
    assert any(n > 1 for n in shards.values())
    units = {lv.name: lv.n_units for lv in ctx.geography.levels}
    assert {s.level: s.units for s in before.steps if s.kind == "persons"} == units
    for s in before.steps:  # the full estimator draws every answer of every query
        drawn = sum(pl.scan_parquet(ctx.rd.measurement_path(s.kind, s.level, k)).select(pl.len()).collect().item()
                    for k in range(s.shards))
        assert drawn == s.answers, (s.kind, s.level)
    after = plan_run(cfg)
    assert after.budget_left == Fraction(100) - before.rho


def test_cli_plan_prints_and_reserves_nothing(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, persons=800, seed=5)
    cfg = write_config(tmp_path, inputs, release_id="never", privacy={"lifetime_rho": "1"})
    res = subprocess.run([sys.executable, "-m", "dptab.cli", "run", str(cfg), "--plan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "block_group" in res.stdout and "the run would be refused" in res.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "releases").exists()
    assert not (tmp_path / "ledger.sqlite").exists()


def test_shard_areas_name_the_states_of_each_shard() -> None:
    import numpy as np

    from pipeline.job.plan import shard_areas
    from pipeline.model.geography import Geography, load_geolevels

    # two blocks in each of three block groups of state 10, one block group of state 44
    blocks = ["100010001001001", "100010001001002", "100010001002001", "100010001002002",
              "100030002001001", "100030002001002", "440010001001001", "440010001001002"]
    geo = Geography.from_block_geoids(np.array(blocks), load_geolevels())
    # block-group parents of the block level: 4; shards [0, 2) [2, 4)
    assert shard_areas(geo, "block", np.array([0, 2, 4])) == ["10", "10-44"]
    assert shard_areas(geo, "block", np.array([0, 1, 2, 3, 4])) == ["10", "10", "10", "44"]
    assert shard_areas(geo, "state", np.array([0, 1])) == [""]


def test_objects_built_from_run_files_once_under_threads() -> None:
    """The shards a level starts together on threads ask for the same object (a level's
    invariants, the geography) at once: it is built once and shared, and a build that fails
    is not kept (the next caller builds it)."""
    import threading
    import time

    from pipeline.job import context

    calls: list[int] = []

    def build() -> object:
        calls.append(1)
        time.sleep(0.2)  # every thread arrives while the first builds
        return object()

    key = f"test {time.time_ns()}"
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(context._built(key, "sha", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)

    def fail() -> object:
        raise OSError("unreadable")

    with pytest.raises(OSError):
        context._built(key + " failing", "sha", fail)
    assert context._built(key + " failing", "sha", build) is not None and len(calls) == 2
    assert not context._BUILDING
