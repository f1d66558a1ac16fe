"""`state.json` checkpoints under concurrency: shard tasks finishing together (threads of the
Prefect thread runner, worker processes, Dask workers) must each be recorded — a lost record
would make a level report fewer parents and hide an uncertified one."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.job.rundir import RunDir

N = 60


def _mark(args: tuple[str, int]) -> int:
    root, i = args
    RunDir.open(Path(root)).mark_done(f"shard:persons:block:{i:05d}", {"parents": i, "diagnostics": {"x": i}})
    return i


def _fresh(tmp: Path) -> RunDir:
    return RunDir.create(tmp / "runs", "r", {"release_id": "r"})


def _all_recorded(rd: RunDir) -> None:
    done = rd.state()["done"]
    missing = [i for i in range(N) if f"shard:persons:block:{i:05d}" not in done]
    assert not missing, f"{len(missing)} of {N} shard records lost: {missing[:10]}"
    assert sum(done[f"shard:persons:block:{i:05d}"]["parents"] for i in range(N)) == sum(range(N))


def test_threads(tmp_path: Path) -> None:
    rd = _fresh(tmp_path)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(_mark, [(str(rd.root), i) for i in range(N)]))
    _all_recorded(rd)


def test_processes(tmp_path: Path) -> None:
    rd = _fresh(tmp_path)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_mark, [(str(rd.root), i) for i in range(N)])
    _all_recorded(rd)


def test_dask_workers(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    rd = _fresh(tmp_path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=4, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.gather(client.map(_mark, [(str(rd.root), i) for i in range(N)]))
    _all_recorded(rd)
