"""Top-down entry points: the root alone, and every parent of one level.

``solve_root`` solves the nation histogram; ``solve_level`` solves every parent of one level
and returns the children's integer histograms with :class:`LevelDiagnostics`. The level is
split into contiguous parent ranges (work items, :class:`RangeJob`) handed to an injected
``mapper``; the caller chooses how they run (serially by default, or a process pool: the
work items are picklable and :func:`solve_range` is a top-level function). Each work item pins
BLAS to one thread. Within a range, :func:`solver.plan` decides every parent's path. Every
parent is verified after its solve (``checks.verify_children``); a violation raises
:class:`PostprocessError` naming it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.diagnostics import LevelDiagnostics, ParentStats
from pipeline.postprocess.parent import (
    Prepared,
    finish_parent,
    prepare_parent,
    solve_least_squares,
)
from pipeline.postprocess.problem import LevelBatch, ParentProblem, PostprocessError
from pipeline.postprocess.solver import AdmmSolver, SolveOptions, Solver, plan

T = TypeVar("T")
R = TypeVar("R")
Mapper = Callable[[Callable[[T], R], Sequence[T]], list[R]]


def serial_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """The default mapper: ``[fn(x) for x in items]`` in this process."""
    return [fn(x) for x in items]


def solve_root(
    spec: HistogramSpec,
    targets: dict[str, np.ndarray],
    variances: dict[str, float],
    total: int | None = None,
    lower: np.ndarray | None = None,
    zero_answers: np.ndarray | None = None,
    options: SolveOptions | None = None,
    label: str = "root",
    solver: Solver | None = None,
) -> tuple[np.ndarray, LevelDiagnostics]:
    """The root histogram: int64 ``(n_cells,)`` from targets ``(1, n_answers)`` per query.

    ``total``: exact root total (invariant) or None; ``lower`` (1, n_answers(hhgq)) and
    ``zero_answers`` (1, n_answers(hhgq)) as for children; ``solver``: default
    :class:`solver.AdmmSolver`. Runs in this process with BLAS pinned to one thread.
    """
    t0 = time.perf_counter()
    prob = ParentProblem(
        spec, None, {q: np.asarray(y, dtype=np.float64).reshape(1, -1) for q, y in targets.items()},
        variances, totals=None if total is None else np.array([int(total)]),
        lower=lower, zero_answers=zero_answers, label=label,
    )
    options = options or SolveOptions()
    with threadpool_limits(1, "blas"):
        prep = prepare_parent(prob, options)
        paths = plan([prep], options)  # the root is never batched (no parent): single
        if paths.shortcut:
            N = prep.shortcut
        else:
            X = solve_least_squares([prep], options, False, solver)[0]
            N = finish_parent(prep, X, options)
        st = prep.st
    assert N is not None
    diag = LevelDiagnostics("root")
    diag.add(st, 1)
    diag.seconds = time.perf_counter() - t0
    return N[0], diag


def _named(batch: LevelBatch, idx: list[int], fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``; any numerical failure names the parent(s) involved."""
    try:
        return fn(*args)
    except PostprocessError:
        raise
    except Exception as exc:
        names = [batch.label(i) for i in idx]
        what = f"parent {names[0]!r}" if len(names) == 1 else f"batch of parents {names[:5]}..."
        raise PostprocessError(f"{what}: {exc!r}") from exc


@dataclass(frozen=True)
class RangeJob:
    """One work item of :func:`solve_level`: a contiguous range of parents as their own
    (rebased) :class:`LevelBatch`, with the level's options. Picklable."""

    batch: LevelBatch
    options: SolveOptions
    level: str
    solver: Solver


def solve_range(job: RangeJob) -> tuple[np.ndarray, LevelDiagnostics]:
    """Every parent of ``job.batch``: children int64 ``(n_children, n_cells)`` and diagnostics.

    BLAS is pinned to one thread here (the work item may run in any process). Parents take the
    paths :func:`solver.plan` gives them: shortcuts, then the single parents in order, then
    the batches.
    """
    batch, options = job.batch, job.options
    diag = LevelDiagnostics(job.level)
    out = np.zeros((batch.n_children, batch.spec.n_cells), dtype=np.int64)

    def put(i: int, N: np.ndarray, st: ParentStats) -> None:
        c0 = int(batch.child_ptr[i])
        out[c0:c0 + N.shape[0]] = N
        diag.add(st, N.shape[0])

    with threadpool_limits(1, "blas"):
        preps: list[Prepared] = [
            _named(batch, [i], prepare_parent, batch.problem(i), options)
            for i in range(batch.n_parents)
        ]
        paths = plan(preps, options)
        # diagnostics in parent order for shortcuts and single parents, as they are met
        batched = {i for g in paths.batches for i in g}
        for i, prep in enumerate(preps):
            if i in batched:
                continue
            if prep.shortcut is not None:
                put(i, prep.shortcut, prep.st)
            else:
                X = _named(batch, [i], solve_least_squares, [prep], options, False, job.solver)[0]
                put(i, _named(batch, [i], finish_parent, prep, X, options), prep.st)
        for group in paths.batches:
            Xs = _named(batch, group, solve_least_squares, [preps[i] for i in group], options,
                        True, job.solver)
            for i, X in zip(group, Xs):
                put(i, _named(batch, [i], finish_parent, preps[i], X, options), preps[i].st)
    return out, diag


def ranges(child_ptr: np.ndarray, n_chunks: int) -> list[tuple[int, int]]:
    """Split parents into at most ``n_chunks`` contiguous ranges of roughly equal work
    (children, at least 1 per parent)."""
    n = child_ptr.size - 1
    if n == 0:
        return []
    work = np.cumsum(np.maximum(np.diff(child_ptr), 1))
    cuts = np.searchsorted(work, np.linspace(0, work[-1], n_chunks + 1)[1:-1], side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [n]]))
    return [(int(s), int(e)) for s, e in itertools.pairwise(bounds) if e > s]


def solve_level(
    batch: LevelBatch,
    options: SolveOptions | None = None,
    level: str = "",
    mapper: Mapper[RangeJob, tuple[np.ndarray, LevelDiagnostics]] | None = None,
    chunks: int = 1,
    solver: Solver | None = None,
) -> tuple[np.ndarray, LevelDiagnostics]:
    """Solve all parents of one level: returns children int64 ``(n_children, n_cells)``.

    The parents are cut into ``chunks`` contiguous ranges of about equal work; each range is
    one :class:`RangeJob` and ``mapper(solve_range, jobs)`` must return their results in
    order (default: serially here). A process-pool map gives identical results (every parent
    is deterministic and independent of the ranges). ``solver``: default
    :class:`solver.AdmmSolver` (must be picklable for a process pool).
    """
    t0 = time.perf_counter()
    options = options or SolveOptions()
    solver = solver or AdmmSolver()
    diag = LevelDiagnostics(level)
    rs = ranges(batch.child_ptr, max(1, chunks))
    # ship each work item only its parents' rows (one range: the batch itself, no copy)
    jobs = [RangeJob(batch if (s, e) == (0, batch.n_parents) else batch.slice(s, e),
                     options, level, solver) for s, e in rs]
    results = (mapper or serial_map)(solve_range, jobs)
    out = np.zeros((batch.n_children, batch.spec.n_cells), dtype=np.int64)
    for (s, _), (part, d) in zip(rs, results):
        a = int(batch.child_ptr[s])
        out[a:a + part.shape[0]] = part
        diag.merge(d)
    diag.seconds = time.perf_counter() - t0
    return out, diag
