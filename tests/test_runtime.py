"""The allocator defaults (``pipeline.runtime``) reach every process of a run, and an operator's
own setting wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.job.executor import Executor
from pipeline.runtime import allocator_defaults

_KEYS = ("NUMPY_MADVISE_HUGEPAGE", "ARROW_DEFAULT_MEMORY_POOL")
_PROBE = ("import json, os, dptab, numpy, pyarrow; "
          "print(json.dumps({'env': {k: os.environ.get(k) for k in %r}, "
          "'pool': pyarrow.default_memory_pool().backend_name}))" % (_KEYS,))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _KEYS}
    env.update(extra)
    return env


def _probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_command_sets_the_defaults_before_numpy_and_pyarrow_load() -> None:
    got = _probe(_clean_env())
    want = allocator_defaults()
    assert got["env"]["NUMPY_MADVISE_HUGEPAGE"] == "0"
    assert got["env"]["ARROW_DEFAULT_MEMORY_POOL"] == want.get("ARROW_DEFAULT_MEMORY_POOL")
    if "ARROW_DEFAULT_MEMORY_POOL" in want:
        assert got["pool"] == want["ARROW_DEFAULT_MEMORY_POOL"]  # the pool really is the one asked for


def test_an_operators_setting_wins() -> None:
    got = _probe(_clean_env(NUMPY_MADVISE_HUGEPAGE="1", ARROW_DEFAULT_MEMORY_POOL="system"))
    assert got["env"] == {"NUMPY_MADVISE_HUGEPAGE": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"}
    assert got["pool"] == "system"


def _worker_env(_: int) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in _KEYS}


def test_pool_workers_get_the_defaults_even_when_the_caller_did_not_set_them(monkeypatch) -> None:
    for k in _KEYS:
        monkeypatch.delenv(k, raising=False)
    ex = Executor(2)
    try:
        seen = ex.map(_worker_env, [0, 1])
    finally:
        ex.close()
    want = {k: allocator_defaults().get(k) for k in _KEYS}
    assert seen == [want, want]
    assert all(k not in os.environ for k in _KEYS)  # the caller's own environment is restored


def _rss_after_freeing(mb: int) -> tuple[int, float]:
    """(pid, resident MB) of a worker right after it made and freed ``mb`` MB of arrays."""
    import time

    import numpy as np
    import psutil

    a = np.ones(mb * 2**17)  # from the heap in a worker (no mmap), kept when freed
    del a
    time.sleep(0.5)  # both workers take one
    return os.getpid(), psutil.Process().memory_info().rss / 2**20


def _rss(_: int) -> tuple[int, float]:
    import time

    import psutil

    time.sleep(0.3)
    return os.getpid(), psutil.Process().memory_info().rss / 2**20


def test_a_worker_keeps_a_shards_worth_of_freed_memory_and_returns_more() -> None:
    """With glibc, a worker's large arrays come from its heap and what it frees stays there while
    its task runs; after the task it keeps up to ``WORKER_KEEP_FREE_BYTES`` (512 MB) for the next
    one (reused without the kernel's page faults) and gives back the rest."""
    import platform

    from pipeline.runtime import WORKER_KEEP_FREE_BYTES

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_MAX_" in os.environ:
        return
    keep = WORKER_KEEP_FREE_BYTES / 2**20
    ex = Executor(2)
    try:
        for mb, kept in ((int(keep * 0.6), True), (int(keep * 1.5), False)):
            during = dict(ex.map(_rss_after_freeing, [mb, mb]))
            after = dict(ex.map(_rss, [0, 1]))
            assert all(v > mb - 50 for v in during.values()), (mb, during)  # held while the task ran
            both = set(during) & set(after)
            assert both, (during, after)
            if kept:
                assert all(after[pid] > mb - 50 for pid in both), (mb, during, after)
            else:
                assert all(after[pid] < during[pid] - mb + 100 for pid in both), (mb, during, after)
    finally:
        ex.close()


def test_a_worker_gives_back_what_it_kept_when_the_next_step_begins() -> None:
    """What a worker keeps for the next item of a step (above) is given back before its first
    item of the run's next step (``Executor.next_step``: the next level's items are not the
    last one's, and a level's largest item must not stay in every later level's memory); items
    of the same step keep it."""
    import platform

    from pipeline.runtime import WORKER_KEEP_FREE_BYTES

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_MAX_" in os.environ:
        return
    mb = int(WORKER_KEEP_FREE_BYTES / 2**20 * 0.6)
    ex = Executor(2)
    try:
        during = dict(ex.map(_rss_after_freeing, [mb, mb]))
        same = dict(ex.map(_rss, [0, 1]))  # the same step: kept
        ex.next_step()
        nxt = dict(ex.map(_rss, [0, 1]))   # the next step: given back first
        both = set(during) & set(same) & set(nxt)
        assert both, (during, same, nxt)
        assert all(same[pid] > mb - 50 for pid in both), (mb, during, same)
        assert all(nxt[pid] < same[pid] - mb + 100 for pid in both), (mb, same, nxt)
    finally:
        ex.close()


def test_free_heap_pages_go_back_to_the_system_on_glibc() -> None:
    """``return_free_memory`` finds glibc's ``malloc_trim`` on a glibc Linux and gives back
    what a thread freed in its malloc arena but the arena kept (every tenth block still held,
    so its heap cannot shrink from the top: ~390 MB resident before, ~55 MB after when measured);
    elsewhere it is a no-op."""
    import platform
    import threading

    import psutil

    from pipeline.runtime import _glibc, return_free_memory

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert sys.platform == "linux" or _glibc() is None
        return
    assert _glibc() is not None
    me = psutil.Process()

    held: list[bytearray] = []

    def churn() -> None:  # 400 MB of 100 kB blocks (malloc, not mmap) in this thread's arena
        keep = [bytearray(100_000) for _ in range(4000)]
        held.extend(keep[::10])
        keep.clear()

    t = threading.Thread(target=churn)
    t.start()
    t.join()
    before = me.memory_info().rss
    return_free_memory()
    assert me.memory_info().rss < before - 200 * 2**20
    assert len(held) == 400
