"""The local shard window (`pipeline.job.stages._ShardWindow`): shards of a level run a few at a
time on threads, their results come back in shard order, a slow shard does not hold up the
shards after it, and a failure stops the level without starting more shards."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.job.stages import _ShardWindow


def test_results_in_shard_order_while_a_slow_shard_runs() -> None:
    finished: list[int] = []
    lock = threading.Lock()

    def run(s: int) -> dict:
        time.sleep(0.5 if s == 0 else 0.01)  # shard 0 holds a large parent
        with lock:
            finished.append(s)
        return {"shard": s}

    w = _ShardWindow(range(6), run, size=3)
    try:
        assert [w.result(s)["shard"] for s in range(6)] == list(range(6))
    finally:
        w.close()
    # the other threads went on with shards 1..5 while shard 0 ran
    assert finished[-1] == 0 and sorted(finished) == list(range(6))


def test_at_most_size_shards_at_once() -> None:
    running, peak = 0, 0
    lock = threading.Lock()

    def run(s: int) -> dict:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return {}

    w = _ShardWindow(range(12), run, size=3)
    try:
        for s in range(12):
            w.result(s)
    finally:
        w.close()
    assert peak == 3


def test_a_failed_shard_raises_and_no_further_shard_starts() -> None:
    started: list[int] = []

    def run(s: int) -> dict:
        started.append(s)
        if s == 1:
            raise RuntimeError("shard 1 failed")
        time.sleep(0.05)
        return {}

    w = _ShardWindow(range(50), run, size=2)
    with pytest.raises(RuntimeError, match="shard 1 failed"):
        try:
            for s in range(50):
                w.result(s)
        finally:
            w.close()
    assert len(started) < 50  # the shards not yet started were dropped
