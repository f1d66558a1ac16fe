"""Terminal progress for ``dptab run``: one bar per level (parents/s, ETA) and a stage log.

Progress is presentation only: it prints counts and timings, never data values.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    """Context manager that runs stages and shard loops with rich progress bars."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        # off a terminal (logs) lines are not wrapped at 80 columns: paths stay whole
        self.console = console or Console(stderr=True, soft_wrap=not sys.stderr.isatty(),
                                          width=None if sys.stderr.isatty() else 200)
        self._progress: Progress | None = None

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage, printing its name and duration."""
        t0 = time.perf_counter()
        out = fn()
        if self.enabled:
            self.console.log(f"{name}: {time.perf_counter() - t0:.1f} s")
        return out

    def shards(self, name: str, shards: Sequence[int], fn: Callable[[int], dict[str, Any]],
               areas: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Run ``fn`` over shards with a bar counting parents (from each shard's ``parents``)
        and naming where the current shard lies (``areas[shard]``: state codes). Off a terminal
        (cron, logs), a line per shard at most every 10 s: shards done, area, parents/s, ETA."""
        infos: list[dict[str, Any]] = []
        task = None
        live = self._progress is not None and self.console.is_terminal
        if self._progress is not None:
            task = self._progress.add_task(name, total=len(shards), rate="")
        t0 = last_log = time.perf_counter()
        parents = 0
        for k, s in enumerate(shards, start=1):
            where = f" state {areas[s]}" if areas and s < len(areas) and areas[s] else ""
            if task is not None and live:
                self._progress.update(task, rate=f"{parents} parents{where}")
            info = fn(s)
            infos.append(info)
            parents += int(info.get("parents", 0))
            now = time.perf_counter()
            rate = parents / max(now - t0, 1e-9)
            if task is not None:
                self._progress.update(task, advance=1, rate=f"{parents} parents, {rate:,.0f}/s{where}")
            if self.enabled and not live and len(shards) > 1 and (now - last_log >= 10 or k == len(shards)):
                eta = (now - t0) / k * (len(shards) - k)
                self.console.log(f"{name}: shard {k}/{len(shards)}{where}, {parents:,} parents, {rate:,.0f}/s, "
                                 f"ETA {eta:,.0f} s")
                last_log = now
        return infos

    def report(self, label: str, done: int, total: int) -> None:
        """Progress of a loop whose steps arrive elsewhere (levels of a review, trials of an
        experiment): a bar with ETA on a terminal, one plain line per step in logs."""
        if not self.enabled:
            return
        if self._progress is not None and self.console.is_terminal:
            tasks = self.__dict__.setdefault("_report_tasks", {})
            if label not in tasks:
                tasks[label] = self._progress.add_task(label, total=total, rate="")
            self._progress.update(tasks[label], completed=done, total=total)
        else:
            self.console.log(f"{label}: {done}/{total}")
