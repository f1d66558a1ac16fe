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
