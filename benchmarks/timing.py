"""One timing helper for every benchmark script: the median of repeated runs."""

from __future__ import annotations

import statistics
import time
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
