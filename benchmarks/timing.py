"""Helpers shared by the benchmark scripts: the median of repeated runs; a run's stage records."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    """Run ``fn`` ``repeats`` times; returns (median seconds by ``clock``, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t = clock()
        out = fn()
        times.append(clock() - t)
    return statistics.median(times), out


def run_stages(run_dir: Path) -> dict[str, dict]:
    """Every finished stage of a run directory: ``state.json``'s ``done`` with the per-shard
    records of ``shards.jsonl`` (the format ``pipeline.job.rundir`` writes; read here without
    importing ``pipeline``, which ``benchmarks/pipeline.py`` shadows when run as a script)."""
    done = dict(json.loads((run_dir / "state.json").read_text())["done"])
    journal = run_dir / "shards.jsonl"
    if journal.is_file():
        for line in journal.read_text().splitlines():
            rec = json.loads(line)
            done[rec["stage"]] = rec["info"]
    return done


class TreeCPU:
    """CPU seconds of this process and every descendant (worker pools, a fork server's children)
    while the ``with`` block runs, sampled every ``interval`` seconds on a thread: each process's
    last sample counts (what it used between its last sample and its end, and a process shorter
    than ``interval``, are missed; a reaped child's time is not taken again from its parent's
    ``children_*``, which would count it twice). ``cpu``: seconds, ``wall``: seconds,
    ``utilisation``: cpu / wall (1.0 = one core busy)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.cpu, self.wall = interval, 0.0, 0.0
        self._seen: dict[tuple[int, float], float] = {}

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        try:
            procs = [me] + me.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self._seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.NoSuchProcess:
                continue

    def __enter__(self) -> "TreeCPU":
        import threading

        self._poll()
        self._start = dict(self._seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.wall = time.perf_counter() - self._t0
        self.cpu = sum(v - self._start.get(k, 0.0) for k, v in self._seen.items())

    @property
    def utilisation(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0
