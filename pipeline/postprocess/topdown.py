"""Top-down entry points: the root alone, and every parent of one level.

``solve_root`` solves the nation histogram; ``solve_level`` solves every parent of one level
and returns the children's integer histograms with :class:`LevelDiagnostics`. The level is
cut into work items (:class:`RangeJob`), longest processing time first (:func:`work_items`:
batches and single parents by estimated cost, the largest items first), handed to an
injected ``mapper``; the caller chooses how they run (serially by default, or a process pool:
the work items are picklable and :func:`solve_range` is a top-level function). Each work item
pins BLAS to one thread. :func:`solver.plan` decides every parent's path; its batches are
formed within contiguous parent ranges (:func:`ranges`), so they do not depend on how the
items are packed. Every parent is verified after its solve (``checks.verify_children``); a
violation raises :class:`PostprocessError` naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.diagnostics import LevelDiagnostics, ParentStats
from pipeline.postprocess.parent import (
    Prepared,
    finish_parent,
    prepare_parent,
    solve_least_squares,
)
from pipeline.postprocess.problem import LevelBatch, ParentProblem, PostprocessError
from pipeline.postprocess.solver import (
    AdmmSolver,
    SolveOptions,
    Solver,
    parent_cost,
    plan,
    plan_sizes,
)

T = TypeVar("T")
R = TypeVar("R")
Mapper = Callable[[Callable[[T], R], Sequence[T]], list[R]]

_BLAS: ThreadpoolController | None = None


def _one_blas_thread() -> Any:
    """``threadpool_limits(1, "blas")`` as a context manager, from a controller made once per
    process: making one scans every library the process has loaded, ~1% of a block-level work
    item's time when made per item (profile of a 30 M run)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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
    with _one_blas_thread():
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
    """One work item of :func:`solve_level`: some parents of the level as their own
    (rebased) :class:`LevelBatch`, with the level's options. ``groups``: the batches of the
    batched ADMM as positions in the item's parents (None: :func:`solver.plan` forms them).
    ``parents``: the item's parents in ``batch`` (None: all of them); they are copied out
    only when the item is pickled for a worker or solved, so the queued items of a level
    hold no copies of its arrays. Picklable (as the item's parents alone)."""

    batch: LevelBatch
    options: SolveOptions
    level: str
    solver: Solver
    groups: tuple[tuple[int, ...], ...] | None = None
    parents: tuple[int, ...] | None = None

    def parents_batch(self) -> LevelBatch:
        """The item's parents as their own batch."""
        return self.batch if self.parents is None else self.batch.take(list(self.parents))

    def __reduce__(self) -> tuple[Any, ...]:
        return (RangeJob, (self.parents_batch(), self.options, self.level, self.solver,
                           self.groups, None))


def solve_range(job: RangeJob) -> tuple[np.ndarray, np.ndarray, LevelDiagnostics]:
    """Every parent of ``job.batch``: the nonzero entries of the children's int64
    ``(n_children, n_cells)`` histograms as ascending flat indices (int64) and their counts
    (int64), and diagnostics. Sparse because the result goes back through a pipe when the item
    ran in a worker process, and the dense histograms of blocks are ~99.7% zeros (16 KB a
    block of the 2020 persons histogram, against ~0.1 KB of entries).

    BLAS is pinned to one thread here (the work item may run in any process). Parents take the
    paths :func:`solver.plan` gives them (the batches ``job.groups`` when given): shortcuts,
    then the single parents in order, then the batches.
    """
    batch, options = job.parents_batch(), job.options
    diag = LevelDiagnostics(job.level)
    out = np.zeros((batch.n_children, batch.spec.n_cells), dtype=np.int64)

    def put(i: int, N: np.ndarray, st: ParentStats) -> None:
        c0 = int(batch.child_ptr[i])
        out[c0:c0 + N.shape[0]] = N
        diag.add(st, N.shape[0])

    with _one_blas_thread():
        preps: list[Prepared] = [
            _named(batch, [i], prepare_parent, batch.problem(i), options)
            for i in range(batch.n_parents)
        ]
        paths = plan(preps, options)
        if job.groups is not None:
            groups = [list(g) for g in job.groups]
            if sorted(i for g in groups for i in g) != sorted(i for g in paths.batches for i in g):
                raise PostprocessError(f"level {job.level}: work item's batches do not match its plan")
            paths.batches = groups
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
    flat = np.flatnonzero(out)
    return flat, out.ravel()[flat], diag


@dataclass
class _Item:
    """Parents of one work item (level indices, ascending), its batches, its estimated cost."""

    parents: list[int]
    groups: list[list[int]]
    cost: float = 0.0


def work_items(batch: LevelBatch, options: SolveOptions, n_items: int) -> list[_Item]:
    """Cut a level's parents into at most ``n_items`` work items, longest processing time
    first (:func:`solver.parent_cost` per parent).

    The batches are those :func:`solver.plan` forms over the whole level, whatever
    ``n_items`` is: a batch's members and padding change its floating-point results in the
    last bits, and so, now and then, a published integer — batches formed per work item made
    a release depend on the number of workers (measured at 10 M persons: 1 and 2 workers
    published different counts). The units (one per batch, per single parent, and the
    shortcuts together) are taken by decreasing cost, each into the item with the least work
    so far, so a large parent is never queued behind small ones in the same item; items
    come out by decreasing work (a pool starts the largest first)."""
    k = np.diff(batch.child_ptr)
    parents = np.asarray(batch.parents)
    nonzero = parents != 0
    n_free = (nonzero & ~batch.spec.structural_zero_mask[None, :]).sum(axis=1)
    shortcut = (k <= 1) | ~nonzero.any(axis=1)
    batchable = np.zeros(k.size, dtype=bool)
    units: list[tuple[float, list[int], list[int] | None]] = []  # (cost, parents, batch)
    # the batches of the whole level, as one work item forms them (never per item)
    p = plan_sizes(shortcut.tolist(), [True] * k.size, k.tolist(), n_free.tolist(), options)
    for g in p.batches:
        batchable[list(g)] = True
    cost = parent_cost(k, n_free, batchable)
    for g in p.batches:
        idx = list(g)
        units.append((float(cost[idx].sum()), sorted(idx), idx))
    units.extend((float(cost[i]), [i], None) for i in p.single)
    if p.shortcut:
        units.append((1.0 * len(p.shortcut), list(p.shortcut), None))
    items = [_Item([], []) for _ in range(max(1, min(n_items, len(units))))]
    for c, idx, grp in sorted(units, key=lambda u: -u[0]):  # stable: ties in level order
        it = min(items, key=lambda x: x.cost)
        it.cost += c
        it.parents.extend(idx)
        if grp is not None:
            it.groups.append(grp)
    items = [it for it in items if it.parents]
    for it in items:
        it.parents.sort()
    return sorted(items, key=lambda x: -x.cost)


def solve_level(
    batch: LevelBatch,
    options: SolveOptions | None = None,
    level: str = "",
    mapper: Mapper[RangeJob, tuple[np.ndarray, np.ndarray, LevelDiagnostics]] | None = None,
    chunks: int = 1,
    solver: Solver | None = None,
) -> tuple[np.ndarray, LevelDiagnostics]:
    """Solve all parents of one level: returns children int64 ``(n_children, n_cells)``.

    The parents are cut into at most ``chunks`` work items, longest processing time first
    (:func:`work_items`); each is one :class:`RangeJob` and ``mapper(solve_range, jobs)``
    must return their results in order (default: serially here); the children come back in
    the level's parent order. A process-pool map and any ``chunks`` give identical results (every parent is
    deterministic and its batch does not depend on ``chunks``). ``solver``: default
    :class:`solver.AdmmSolver` (must be picklable for a process pool).
    """
    t0 = time.perf_counter()
    options = options or SolveOptions()
    solver = solver or AdmmSolver()
    diag = LevelDiagnostics(level)
    out = np.zeros((batch.n_children, batch.spec.n_cells), dtype=np.int64)
    if max(1, chunks) == 1 or batch.n_parents == 0:
        # one item: the batch itself, no copy, batches formed by plan
        jobs = [RangeJob(batch, options, level, solver)] if batch.n_parents else []
        rows = [np.arange(batch.n_children)]
    else:
        items = work_items(batch, options, chunks)
        jobs, rows = [], []
        for it in items:
            pos = {p: j for j, p in enumerate(it.parents)}
            groups = tuple(tuple(pos[p] for p in g) for g in it.groups)
            jobs.append(RangeJob(batch, options, level, solver, groups, tuple(it.parents)))
            rows.append(batch.child_rows(it.parents))
    results = (mapper or serial_map)(solve_range, jobs)
    # diagnostics merged in level order of the items' first parents (as the ranges were)
    for j in sorted(range(len(jobs)), key=lambda j: int(rows[j][0]) if rows[j].size else -1):
        flat, values, d = results[j]
        r, c = np.divmod(flat, batch.spec.n_cells)
        out[rows[j][r], c] = values
        diag.merge(d)
    diag.seconds = time.perf_counter() - t0
    return out, diag
