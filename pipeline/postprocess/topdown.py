"""Top-down driver: the root alone, then one level at a time, parent by parent.

``solve_root`` solves the nation histogram; ``solve_level`` solves every parent of one level
(in contiguous parent ranges, run by the caller's mapper) and returns the children's integer histograms with :class:`LevelDiagnostics`;
``run_topdown`` chains levels for tests and small runs. Every parent is verified after its
solve (``checks.verify_children``); a violation raises :class:`PostprocessError` naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.diagnostics import LevelDiagnostics, ParentStats
from pipeline.postprocess.parent import (
    Prepared,
    SolveOptions,
    batchable,
    finish_parent,
    prepare_parent,
    solve_least_squares,
    solve_parent,
)
from pipeline.postprocess.problem import LevelBatch, ParentProblem, PostprocessError


def solve_root(
    spec: HistogramSpec,
    targets: dict[str, np.ndarray],
    variances: dict[str, float],
    total: int | None = None,
    lower: np.ndarray | None = None,
    zero_answers: np.ndarray | None = None,
    options: SolveOptions | None = None,
    label: str = "root",
) -> tuple[np.ndarray, LevelDiagnostics]:
    """The root histogram: int64 ``(n_cells,)`` from targets ``(1, n_answers)`` per query.

    ``total``: exact root total (invariant) or None; ``lower`` (1, n_answers(hhgq)) and
    ``zero_answers`` (1, n_answers(hhgq)) as for children.
    """
    t0 = time.perf_counter()
    prob = ParentProblem(
        spec, None, {q: np.asarray(y, dtype=np.float64).reshape(1, -1) for q, y in targets.items()},
        variances, totals=None if total is None else np.array([int(total)]),
        lower=lower, zero_answers=zero_answers, label=label,
    )
    with threadpool_limits(1, "blas"):
        N, st = solve_parent(prob, options or SolveOptions())
    diag = LevelDiagnostics("root")
    diag.add(st, 1)
    diag.seconds = time.perf_counter() - t0
    return N[0], diag


def _named(batch: LevelBatch, idx: list[int], fn, *args):
    """Run ``fn(*args)``; any numerical failure names the parent(s) involved."""
    try:
        return fn(*args)
    except PostprocessError:
        raise
    except Exception as exc:
        names = [batch.label(i) for i in idx]
        what = f"parent {names[0]!r}" if len(names) == 1 else f"batch of parents {names[:5]}..."
        raise PostprocessError(f"{what}: {exc!r}") from exc


def _batches(preps: list[tuple[int, Prepared]], options: SolveOptions) -> list[list[tuple[int, Prepared]]]:
    """Group batchable parents by free-set size (little padding) under the size caps: at most
    ``batch_size`` parents, ``batch_max_bytes`` of (P, n, n) float64 matrices and
    ``batch_max_entries`` entries in the (P, K, n) iterates (larger batches leave the cache and
    get slower per parent)."""
    preps = sorted(preps, key=lambda ip: ip[1].prob.free_cells().size)
    out: list[list[tuple[int, Prepared]]] = []
    cur: list[tuple[int, Prepared]] = []
    k_max = 0
    for ip in preps:
        n = ip[1].prob.free_cells().size
        k = max(k_max, ip[1].prob.k)
        if cur and (len(cur) == options.batch_size
                    or (len(cur) + 1) * n * n * 8 > options.batch_max_bytes
                    or (len(cur) + 1) * k * n > options.batch_max_entries):
            out.append(cur)
            cur, k = [], ip[1].prob.k
        cur.append(ip)
        k_max = k
    return out + ([cur] if cur else [])


def _solve_range(args) -> tuple[np.ndarray, LevelDiagnostics]:
    """Parents ``start:stop``: small ones by batched ADMM, large ones one by one."""
    batch, start, stop, options, level = args
    diag = LevelDiagnostics(level)
    a, b = int(batch.child_ptr[start]), int(batch.child_ptr[stop])
    out = np.zeros((b - a, batch.spec.n_cells), dtype=np.int64)

    def put(i: int, N: np.ndarray, st: ParentStats) -> None:
        c0 = int(batch.child_ptr[i]) - a
        out[c0:c0 + N.shape[0]] = N
        diag.add(st, N.shape[0])

    with threadpool_limits(1, "blas"):
        pending: list[tuple[int, Prepared]] = []
        for i in range(start, stop):
            prep = _named(batch, [i], prepare_parent, batch.problem(i), options)
            if prep.shortcut is not None:
                put(i, prep.shortcut, prep.st)
            elif options.batched and batchable(prep, options):
                pending.append((i, prep))
            else:
                X = _named(batch, [i], solve_least_squares, [prep], options)[0]
                put(i, _named(batch, [i], finish_parent, prep, X, options), prep.st)
        for group in _batches(pending, options):
            idx = [i for i, _ in group]
            Xs = _named(batch, idx, solve_least_squares, [p for _, p in group], options, True)
            for (i, prep), X in zip(group, Xs):
                put(i, _named(batch, [i], finish_parent, prep, X, options), prep.st)
    return out, diag


def _ranges(child_ptr: np.ndarray, n_chunks: int) -> list[tuple[int, int]]:
    """Split parents into contiguous ranges of roughly equal work (children x 1)."""
    n = child_ptr.size - 1
    if n == 0:
        return []
    work = np.cumsum(np.maximum(np.diff(child_ptr), 1))
    cuts = np.searchsorted(work, np.linspace(0, work[-1], n_chunks + 1)[1:-1], side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [n]]))
    return [(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def solve_level(
    batch: LevelBatch,
    options: SolveOptions | None = None,
    level: str = "",
    mapper: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]] | None = None,
    chunks: int = 1,
) -> tuple[np.ndarray, LevelDiagnostics]:
    """Solve all parents of one level: returns children int64 ``(n_children, n_cells)``.

    The parents are cut into ``chunks`` contiguous ranges of about equal work, each solved by
    ``mapper(fn, items)`` (default: in order, here); the caller's executor may run them in
    worker processes. Results are identical either way (every parent is deterministic).
    """
    t0 = time.perf_counter()
    options = options or SolveOptions()
    diag = LevelDiagnostics(level)
    ranges = _ranges(batch.child_ptr, max(1, chunks))
    out = np.zeros((batch.n_children, batch.spec.n_cells), dtype=np.int64)
    if mapper is not None and len(ranges) > 1:
        # ship each work item only its parents' rows
        results = mapper(_solve_range, [(batch.slice(s, e), 0, e - s, options, level) for s, e in ranges])
    else:
        results = [_solve_range((batch, s, e, options, level)) for s, e in ranges]
    for (s, _), (part, d) in zip(ranges, results):
        a = int(batch.child_ptr[s])
        out[a:a + part.shape[0]] = part
        diag.merge(d)
    diag.seconds = time.perf_counter() - t0
    return out, diag


@dataclass
class LevelInput:
    """Inputs of one level for :func:`run_topdown` (arrays over that level's units).

    ``child_ptr``: CSR offsets from the level above (None for the root level); ``targets``
    per query ``(n_units, n_answers)``; ``totals``/``lower``/``zero_answers`` per unit.
    """

    name: str
    targets: dict[str, np.ndarray]
    variances: dict[str, float]
    child_ptr: np.ndarray | None = None
    totals: np.ndarray | None = None
    lower: np.ndarray | None = None
    zero_answers: np.ndarray | None = None
    labels: np.ndarray | None = None
    multipass: bool = False


def run_topdown(
    spec: HistogramSpec,
    levels: list[LevelInput],
    options: SolveOptions | None = None,
    workers: int = 1,
) -> tuple[dict[str, np.ndarray], list[LevelDiagnostics]]:
    """Root then every level; returns ``{level: int64 (n_units, n_cells)}`` and diagnostics."""
    options = options or SolveOptions()
    root = levels[0]
    hist, d0 = solve_root(
        spec, root.targets, root.variances,
        None if root.totals is None else int(np.asarray(root.totals).ravel()[0]),
        root.lower, root.zero_answers, options, label=root.name,
    )
    d0.level = root.name
    out = {root.name: hist[None, :]}
    diags = [d0]
    parents = hist[None, :]
    parent_labels = None if root.labels is None else np.asarray(root.labels)
    for lev in levels[1:]:
        if lev.child_ptr is None:
            raise PostprocessError(f"level {lev.name!r} needs child_ptr")
        batch = LevelBatch(
            spec, parents, lev.child_ptr, lev.targets, lev.variances, lev.totals, lev.lower,
            lev.zero_answers, labels=parent_labels,
        )
        parent_labels = None if lev.labels is None else np.asarray(lev.labels)
        opts = SolveOptions(**{**options.__dict__, "multipass": lev.multipass})
        parents, d = solve_level(batch, opts, level=lev.name)
        out[lev.name] = parents
        diags.append(d)
    return out, diags
