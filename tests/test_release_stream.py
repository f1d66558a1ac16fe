"""Publishing streams (issue 16): the writer, the verifier and the explorer hold a chunk of a
level's units at a time, and the chunk size never changes a byte of the release."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_release import PRIVACY
from test_tables_cases import make_case

import pipeline.files as files_mod
import pipeline.release.html as html_mod
import pipeline.release.streams as streams_mod
import pipeline.release.tables as tables_mod
import pipeline.release.writer as writer_mod
from pipeline.release.manifest import ReleaseMetadata
from pipeline.release.verify import verify_release
from pipeline.release.writer import write_release


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(tmp: Path, case) -> Path:
    meta = ReleaseMetadata("S1", "synthetic-test", "0.1.0", "ab" * 32, git_commit="0123abc", seed=7,
                           created="2026-01-01T00:00:00+00:00")
    return write_release(tmp / "releases", meta, case.geography, case.persons, case.units, case.invariants, PRIVACY)


def test_chunk_size_changes_no_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups cut every 7 units and every 100 rows (as the format cuts them every 50,000 units
    and 256 Ki rows), the microdata's every 100 persons (256 Ki): streaming 3 units at a time
    (reading the explorer's areas 2 at a time) writes exactly the files one big chunk per level
    writes, the writer tabulates and expands at most 3 units at a time, and the verifier checks at
    most 3 at a time and finds the release clean."""
    case = make_case(1, n_blocks=30)
    monkeypatch.setattr(writer_mod, "CHUNK_UNITS", 7)
    monkeypatch.setattr(files_mod, "ROW_GROUP_ROWS", 100)     # (the other files' row groups)
    monkeypatch.setattr(writer_mod, "TABLE_GROUP_ROWS", 100)  # where the table files' row groups are cut
    monkeypatch.setattr(writer_mod, "MICRODATA_GROUP_ROWS", 100)  # (the microdata's: every 256 Ki persons)
    big = _digests(_write(tmp_path / "big", case))

    seen: dict[str, int] = {"tabulate": 0, "microdata": 0, "checks": 0, "take": 0}
    tabulate, micro = tables_mod.tabulate_units, writer_mod.microdata_from_blocks
    take, add = tables_mod.RowStream.take, writer_mod.ReleaseChecks.add

    def spy_tabulate(ts, level, geoids, *a, **k):
        seen["tabulate"] = max(seen["tabulate"], len(geoids))
        return tabulate(ts, level, geoids, *a, **k)

    def spy_micro(geoids, *a, **k):
        seen["microdata"] = max(seen["microdata"], len(geoids))
        return micro(geoids, *a, **k)

    def spy_take(self, n):
        seen["take"] = max(seen["take"], n)
        return take(self, n)

    def spy_add(self, lt):
        seen["checks"] = max(seen["checks"], len(lt.geoids))
        return add(self, lt)

    monkeypatch.setattr(writer_mod, "STREAM_UNITS", 3)
    monkeypatch.setattr(writer_mod, "MICRODATA_UNITS", 3)
    monkeypatch.setattr(html_mod, "READ_UNITS", 2)
    monkeypatch.setattr(writer_mod, "tabulate_units", spy_tabulate)
    monkeypatch.setattr(writer_mod, "microdata_from_blocks", spy_micro)
    monkeypatch.setattr(tables_mod.RowStream, "take", spy_take)
    monkeypatch.setattr(writer_mod.ReleaseChecks, "add", spy_add)
    path = _write(tmp_path / "small", case)
    assert _digests(path) == big
    assert seen["tabulate"] == 3 and seen["microdata"] == 3 and seen["checks"] == 3
    # the longest read: 3 units x the longest table (73 lines); never a level's rows
    assert 0 < seen["take"] <= 3 * 73
    # the cuts are there: a row group per 7 units of each level, split at 100 rows
    p1 = pq.ParquetFile(path / "tables" / "P1.parquet").metadata
    assert p1.num_row_groups > 7 and max(p1.row_group(i).num_rows for i in range(p1.num_row_groups)) <= 100
    micro = pq.ParquetFile(path / "microdata" / "persons.parquet").metadata
    assert micro.num_row_groups == -(-micro.num_rows // 100) > 1
    assert verify_release(path) == []
    assert seen["checks"] == 3


def _write_with(tmp: Path, case, workers: int, persons=None) -> Path:
    meta = ReleaseMetadata("S1", "synthetic-test", "0.1.0", "ab" * 32, git_commit="0123abc", seed=7,
                           created="2026-01-01T00:00:00+00:00")
    return write_release(tmp / "releases", meta, case.geography, persons or case.persons, case.units, case.invariants,
                         PRIVACY, workers=workers)


def test_background_processes_write_the_same_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``workers > 1`` a large release writes its microdata and checks its data files in
    processes of their own, a smaller one on threads: either folder is byte for byte the one
    written in one process, and it verifies."""
    case = make_case(1, n_blocks=30)
    one = _digests(_write_with(tmp_path / "one", case, workers=1))
    started: list[tuple[str, str]] = []
    niceness: dict[str, int] = {}
    init = streams_mod.Background.__init__

    def spy(self, what, fn, args, mode, nice=0):
        init(self, what, fn, args, mode, nice=nice)
        started.append((what, mode))
        niceness[what] = nice

    monkeypatch.setattr(streams_mod.Background, "__init__", spy)
    monkeypatch.setattr(writer_mod, "BACKGROUND_MIN_BLOCKS", 0)
    path = _write_with(tmp_path / "two", case, workers=2)
    assert started == [("microdata", "process"), ("release check", "process")]
    # the check yields to the explorer written beside it (which would otherwise end alone)
    assert niceness == {"microdata": 0, "release check": writer_mod.CHECK_NICE} and writer_mod.CHECK_NICE > 0
    assert _digests(path) == one
    assert verify_release(path) == []
    # below the threshold no process is started: threads of the writer's process
    started.clear()
    monkeypatch.setattr(writer_mod, "BACKGROUND_MIN_BLOCKS", 31)
    path = _write_with(tmp_path / "three", case, workers=2)
    assert started == [("microdata", "thread"), ("release check", "thread")]
    assert _digests(path) == one
    # with one worker, in sequence
    started.clear()
    _write_with(tmp_path / "four", case, workers=1)
    assert started == [("microdata", "inline"), ("release check", "inline")]


def test_a_background_process_runs_at_the_niceness_it_is_given() -> None:
    """``nice`` lowers a child process's priority by that much (``os.nice(0)``: its niceness)."""
    import os

    here = os.nice(0)
    assert streams_mod.Background("niceness", os.nice, (0,), "process", nice=3).result() == min(here + 3, 19)
    assert streams_mod.Background("niceness", os.nice, (0,), "process").result() == here


def test_a_failure_on_a_publishing_thread_leaves_no_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The microdata written on a thread fails: the writer raises that error and removes its
    folder (after the thread has ended)."""
    case = make_case(1, n_blocks=30)
    block = case.geography.levels[-1].name
    persons = {**case.persons, block: _FailsInChild(case.persons[block], None, thread=True)}
    with pytest.raises(ValueError, match="disk on fire"):
        _write_with(tmp_path, case, workers=2, persons=persons)
    assert list((tmp_path / "releases").iterdir()) == []


def test_a_failure_on_a_table_lane_leaves_no_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making one table's rows fails on its writing lane (another thread): the writer raises that
    error and removes its folder."""
    case = make_case(1, n_blocks=30)
    real = writer_mod.long_table

    def flaky(table, level, *args):
        if table.name == "P3" and level == case.geography.levels[-1].name:
            raise ValueError("lane on fire")
        return real(table, level, *args)

    monkeypatch.setattr(writer_mod, "long_table", flaky)
    with pytest.raises(ValueError, match="lane on fire"):
        _write_with(tmp_path, case, workers=2)
    assert list((tmp_path / "releases").iterdir()) == []


def test_write_queue_keeps_each_keys_order_and_reports_a_failure() -> None:
    """Work of one key runs in the order submitted whatever the lanes' timing; keys share the
    lanes; a failed task raises at the next submit (or wait), and closing stops every lane."""
    import random
    import time

    q = streams_mod.WriteQueue(limit=3, lanes=2)
    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    rng = random.Random(7)

    def work(key: str, i: int, pause: float) -> None:
        time.sleep(pause)
        seen[key].append(i)

    keys = {k: object() for k in seen}
    for i in range(30):
        for k in seen:
            q.submit(keys[k], work, k, i, rng.random() / 500)
    q.wait()
    assert seen == {k: list(range(30)) for k in seen}
    assert len(set(q.lane.values())) == 2

    def boom() -> None:
        raise OSError("disk full")

    q.submit(keys["a"], boom)
    with pytest.raises(OSError, match="disk full"):
        for _ in range(10):
            q.submit(keys["a"], time.sleep, 0.01)
        q.wait()
    q.close(cancel=True)
    assert all(p._shutdown for p in q.pools)


class _FailsInChild:
    """A block histogram that cannot be read in a publishing child process (raises, or the process
    dies as if killed): the parent, which reads it fine, must still refuse the release."""

    def __init__(self, inner, exit_code: int | None, thread: bool = False) -> None:
        from pipeline.release.tables import histogram_shape

        self.inner, self.exit_code, self.thread = inner, exit_code, thread
        self.n_units, self.n_cells = histogram_shape(inner)

    def rows(self, start: int, stop: int):
        import multiprocessing
        import os
        import threading

        from pipeline.release.tables import histogram_rows

        if self.thread and threading.current_thread().name == "dptab-microdata":
            raise ValueError("disk on fire")
        if multiprocessing.current_process().name == "dptab-microdata":
            if self.exit_code is not None:
                os._exit(self.exit_code)
            raise ValueError("disk on fire")
        return histogram_rows(self.inner, start, stop)


@pytest.mark.parametrize("exit_code, message", [(None, "microdata process failed: ValueError: disk on fire"),
                                                (3, "microdata process ended without a result \\(exit code 3\\)")])
def test_a_failed_child_leaves_no_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code, message) -> None:
    from pipeline.release.manifest import ReleaseError

    case = make_case(1, n_blocks=30)
    block = case.geography.levels[-1].name
    persons = {**case.persons, block: _FailsInChild(case.persons[block], exit_code)}
    monkeypatch.setattr(writer_mod, "BACKGROUND_MIN_BLOCKS", 0)
    with pytest.raises(ReleaseError, match=message):
        _write_with(tmp_path, case, workers=2, persons=persons)
    assert list((tmp_path / "releases").iterdir()) == []  # no release, no partial folder


def test_files_a_child_writes_get_the_writers_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's worker pool (and so the fork server the release's child processes come from) is
    started while the run's private files are written (umask 077); the microdata a publishing
    child writes must still get the release's permissions, like every other file."""
    from pipeline.files import private_files
    from pipeline.job import executor as executor_mod

    case = make_case(1, n_blocks=30)
    monkeypatch.setattr(writer_mod, "BACKGROUND_MIN_BLOCKS", 0)
    with private_files():  # as a job's shards start the pool: the fork server inherits umask 077
        executor_mod.executor_for(2).map(abs, [1, 2])
    try:
        path = _write_with(tmp_path, case, workers=2)
    finally:
        executor_mod.close_executor()
    modes = {p.relative_to(path).as_posix(): p.stat().st_mode & 0o777 for p in path.rglob("*") if p.is_file()}
    expected = 0o666 & ~_umask()
    assert modes["microdata/persons.parquet"] == expected, modes
    assert set(modes.values()) == {expected}


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


_ORPHAN_PARENT = """
import sys, time
from pipeline.release.streams import Background

if __name__ == "__main__":
    child = Background("sleeper", time.sleep, (120,), "process")
    print(child._proc.pid, flush=True)
    time.sleep(120)
"""


def test_a_background_process_ends_with_its_parent(tmp_path: Path) -> None:
    """A child of the fork server would outlive a writer killed with ``kill -9`` (the job's
    driver: an operator, the out-of-memory killer) and write on into a release folder that the
    resumed run removes; it ends within seconds of its parent instead."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        else:
            child.kill()
            raise AssertionError("the child outlived its parent by 15 s")
    finally:
        if parent.poll() is None:
            parent.kill()
