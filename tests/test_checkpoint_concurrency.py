"""`state.json` checkpoints under concurrency: shard tasks finishing together (threads of the
Prefect thread runner, worker processes, Dask workers) must each be recorded — a lost record
would make a level report fewer parents and hide an uncertified one."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.job.rundir import RunDir, RunDirIntegrityError

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


def test_shard_records_go_to_the_journal_and_state_json_stays_small(tmp_path: Path) -> None:
    """A national run records thousands of shards: each is one appended line of `shards.jsonl`
    (state.json is not rewritten per shard), and a reader sees them merged into the state."""
    rd = _fresh(tmp_path)
    f = rd.root / "solved" / "x.parquet"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    before = rd.state_path.read_bytes()
    for i in range(5):
        rd.mark_done(f"shard:persons:block:{i:05d}", {"parents": i}, files=[f] if i == 0 else [])
    rd.mark_done("level:persons:block", {"shards": 5})
    assert rd.journal_path.read_text().count("\n") == 5
    assert "shard:" not in rd.state_path.read_text() and rd.state_path.read_bytes() != before
    other = RunDir.open(rd.root)  # another handle (as another stage would open it)
    st = other.state()
    assert [k for k in st["done"] if k.startswith("shard:")] == [f"shard:persons:block:{i:05d}" for i in range(5)]
    assert st["done"]["level:persons:block"]["shards"] == 5
    assert other.is_done("shard:persons:block:00003") and not other.is_done("shard:persons:block:00005")
    assert other.verified(f) == f
    f.write_bytes(b"abd")
    with pytest.raises(RunDirIntegrityError, match="changed since"):
        other.verified(f)


def test_a_record_cut_short_is_not_a_record_and_is_removed_by_the_next(tmp_path: Path) -> None:
    rd = _fresh(tmp_path)
    rd.mark_done("shard:persons:block:00000", {"parents": 1})
    whole = rd.journal_path.read_bytes()
    with rd.journal_path.open("ab") as fh:  # what a kill in the middle of an append leaves
        fh.write(b'{"files": {}, "info": {"parents": 2}, "sta')
    assert not rd.is_done("shard:persons:block:00001")
    assert rd.is_done("shard:persons:block:00000")
    rd.mark_done("shard:persons:block:00001", {"parents": 3})
    lines = rd.journal_path.read_bytes()
    assert lines.startswith(whole) and lines.count(b"\n") == 2 and b'"sta\n' not in lines
    assert RunDir.open(rd.root).done_info("shard:persons:block:00001")["parents"] == 3


def test_a_damaged_record_stops_the_run(tmp_path: Path) -> None:
    rd = _fresh(tmp_path)
    rd.mark_done("shard:persons:block:00000", {"parents": 1})
    rd.journal_path.write_bytes(b"not json\n" + rd.journal_path.read_bytes())
    with pytest.raises(RunDirIntegrityError, match="damaged shard record"):
        RunDir.open(rd.root).state()
