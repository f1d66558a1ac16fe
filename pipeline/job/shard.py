"""One shard of one level: measure the children (write-once), post-process, checkpoint.

A shard is a contiguous range of parents ``bounds[s]:bounds[s+1]`` of the level above; its
children are the contiguous units ``child_ptr[a]:child_ptr[b]`` of the level (CSR). The nation
level is one shard with no parent (the root problem). This module only wires the stages of
``pipeline.privacy.measure`` and ``pipeline.postprocess`` to the files of a run directory.

What each run kind declares (ARCHITECTURE §6, 2020 semantics):

- persons: nation and state totals exact (``invariants.state_totals``); per child, persons in
  GQ type g ≥ facilities of type g and = 0 where there is none, household persons = 0 where
  there is no housing unit (``invariants.gq_facilities`` / ``block_housing_units``).
- units: the histogram is (vacant, occupied) housing units; every child's total is the
  public housing-unit count (``invariants.block_housing_units``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.errors import DptabError
from pipeline.files import crash_point
from pipeline.job.context import RunContext
from pipeline.job.executor import ClusterTasks, Executor
from pipeline.model.histogram import SparseHistogram
from pipeline.postprocess.parent import SolveOptions
from pipeline.postprocess.problem import LevelBatch
from pipeline.postprocess.topdown import solve_level, solve_root
from pipeline.privacy.measure import MeasureResult, load_measurements, measure_shard, reused_measurements


class ConsistencyError(DptabError, RuntimeError):
    """A merged level does not add up to its parent level (a bug: the run stops)."""


def truth_histogram(ctx: RunContext, kind: str, level: str,
                    units: tuple[int, int] | None = None) -> SparseHistogram:
    """The confidential true histogram of one level (persons: the spec's cells; units: vacant /
    occupied); ``units=(start, stop)`` reads only that range of units (indices stay global)."""
    return SparseHistogram.from_parquet(ctx.rd.verified(ctx.rd.truth_path(kind, level)), units)


def published_histogram(ctx: RunContext, kind: str, level: str,
                        units: tuple[int, int] | None = None) -> SparseHistogram:
    """The post-processed (published) integer histogram of a finished level (optionally a unit range)."""
    return SparseHistogram.from_parquet(ctx.rd.verified(ctx.rd.solved_path(kind, level)), units)


def _child_constraints(ctx: RunContext, kind: str, level: str, c0: int, c1: int) -> dict[str, np.ndarray | None]:
    """Exact totals, lower bounds and forced zeros on the spec's ``bound`` query (pl94: ``hhgq``,
    answer 0 = households, 1..7 = group-quarters types) of children ``c0:c1``, from the declared
    public invariants only (``invariants/<level>.parquet``). A spec without the bound role takes
    only the totals: facilities and housing units say nothing about its cells."""
    inv = ctx.invariants(level, (c0, c1))  # row i: unit c0 + i
    if kind == "units":
        return {"totals": inv.housing_units, "lower": None, "zero_answers": None}
    totals = inv.persons
    spec = ctx.spec(kind)
    if not spec.has_role("bound"):
        return {"totals": totals, "lower": None, "zero_answers": None}
    n_ans = spec.query(spec.role("bound")).n_answers  # household + one answer per facility type
    lower = zero = None
    if inv.facilities is not None:
        fac = inv.facilities
        lower = np.concatenate([np.zeros((c1 - c0, 1), np.int64), fac], axis=1)
        zero = np.concatenate([np.zeros((c1 - c0, 1), bool), fac == 0], axis=1)
    if inv.housing_units is not None:
        zero = np.zeros((c1 - c0, n_ans), bool) if zero is None else zero
        zero[:, 0] = inv.housing_units == 0
    if ctx.cfg.joint.households:
        # the published (noisy, post-processed) occupied units of the same children, solved
        # first: persons in households (bound answer 0) >= occupied units, = 0 where there are none
        occupied = published_histogram(ctx, "units", level, (c0, c1)).dense(c0, c1)[:, 1]
        lower = np.zeros((c1 - c0, n_ans), np.int64) if lower is None else lower
        zero = np.zeros((c1 - c0, n_ans), bool) if zero is None else zero
        lower[:, 0] = np.maximum(lower[:, 0], occupied)
        zero[:, 0] |= occupied == 0
    return {"totals": totals, "lower": lower, "zero_answers": zero}


def _shard_range(ctx: RunContext, level: str, shard: int, bounds: np.ndarray) -> tuple[int, int, int, int]:
    """``(a, b, c0, c1)``: the parents ``a:b`` of the level above that shard ``shard`` solves and
    their children ``c0:c1`` (the root level: ``0, 1, 0, 1``)."""
    i = ctx.level_names.index(level)
    if i == 0:
        return 0, 1, 0, 1
    plv = ctx.geography.levels[i - 1]
    a, b = int(bounds[shard]), int(bounds[shard + 1])
    return a, b, int(plv.child_ptr[a]), int(plv.child_ptr[b])


def _measure(ctx: RunContext, kind: str, level: str, shard: int, bounds: np.ndarray) -> MeasureResult:
    """Draw (or reuse) the measurements of one shard's children. Answers whose parent answer is
    0 are skipped unless every answer is to be drawn (``RunConfig.measures_every_answer``)."""
    a, b, c0, c1 = _shard_range(ctx, level, shard, bounds)
    i = ctx.level_names.index(level)
    full = ctx.cfg.measures_every_answer
    path = ctx.rd.measurement_path(kind, level, shard)
    # drawn before (the full estimator's measure step, an earlier attempt): reused without
    # reading the confidential histogram or the parent's answers (~5 s of a 30 M full run)
    reused = reused_measurements(path, ctx.strategies[kind], level, c0, c1, full=full)
    if reused is not None:
        return reused
    parent_hist = parent_of = None
    if i > 0 and not full:
        parent_hist = published_histogram(ctx, kind, ctx.level_names[i - 1], (a, b))
        parent_of = ctx.geography.levels[i].parent[c0:c1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return measure_shard(path, truth_histogram(ctx, kind, level, (c0, c1)), ctx.spec(kind), ctx.strategies[kind],
                         level, c0, c1, ctx.source(kind, level, shard), parent=parent_hist, parent_of=parent_of,
                         full=full)


def measure_only(ctx: RunContext, kind: str, level: str, shard: int, bounds: np.ndarray) -> dict[str, Any]:
    """Draw one shard's measurements without solving (the full estimator's first step)."""
    t0 = time.perf_counter()
    m = _measure(ctx, kind, level, shard, bounds)
    return {"kind": kind, "level": level, "shard": shard, "measured_rows": m.rows,
            "measurements_reused": not m.drawn, "seconds": round(time.perf_counter() - t0, 3)}


def solve_shard(ctx: RunContext, kind: str, level: str, shard: int, bounds: np.ndarray,
                executor: Executor | ClusterTasks) -> dict[str, Any]:
    """Measure (or reuse the measurements of) and post-process one shard; write its published
    children. The targets are the shard's own measurements (``topdown``, and the bottom level of
    ``full``) or the full estimator's subtree estimates of the same queries (``full``; see
    ``pipeline.job.estimate``). Returns a manifest (counts, seconds, diagnostics) with no
    data values."""
    out_path = ctx.rd.solved_shard_path(kind, level, shard)
    t0 = time.perf_counter()
    spec = ctx.spec(kind)
    strategy = ctx.strategies[kind]
    i = ctx.level_names.index(level)
    lv = ctx.geography.levels[i]
    a, b, c0, c1 = _shard_range(ctx, level, shard, bounds)
    m = _measure(ctx, kind, level, shard, bounds)
    crash_point("shard:measured")
    if ctx.cfg.postprocess.estimator == "full" and i < len(ctx.level_names) - 1:
        from pipeline.job.estimate import read_targets

        targets, variances = read_targets(ctx.rd.verified(ctx.rd.estimate_targets_path(kind, level)), spec, c0, c1,
                                          strategy.queries(level))
    else:
        meas = load_measurements(ctx.rd.measurement_path(kind, level, shard), spec, c0, c1)
        targets = {q: qm.values for q, qm in meas.items()}
        variances = {q: qm.variance for q, qm in meas.items()}
    cons = _child_constraints(ctx, kind, level, c0, c1)
    options = SolveOptions(multipass=level in strategy.multipass_levels)
    if i == 0:
        total = None if cons["totals"] is None else int(cons["totals"][0])
        root, diag = solve_root(spec, targets, variances, total, cons["lower"], cons["zero_answers"],
                                options, label=kind + ":nation")
        children = root[None, :]
    else:
        plv = ctx.geography.levels[i - 1]
        parent_hist = published_histogram(ctx, kind, plv.name, (a, b))
        batch = LevelBatch(spec, parent_hist.dense(a, b), plv.child_ptr[a:b + 1] - c0, targets, variances,
                           cons["totals"], cons["lower"], cons["zero_answers"], labels=plv.geoids[a:b])
        children, diag = solve_level(batch, options, level=level, mapper=executor.map, chunks=executor.chunks)
    crash_point("shard:solved")
    out = SparseHistogram.from_dense(level, children)
    shard_hist = SparseHistogram(level, lv.n_units, spec.n_cells, out.unit + c0, out.cell, out.count)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shard_hist.to_parquet(out_path)
    return {"kind": kind, "level": level, "shard": shard, "parents": b - a, "children": c1 - c0,
            "measured_rows": m.rows, "measurements_reused": not m.drawn,
            "seconds": round(time.perf_counter() - t0, 3), "diagnostics": diag.as_dict()}


def merge_level(ctx: RunContext, kind: str, level: str, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate a level's shard outputs (``infos``: their checkpoint manifests, in shard
    order) and check them against the parent level; writes ``solved/<kind>_<level>.parquet``.

    A shard at a time: shard ``s`` holds exactly the children of parents ``bounds[s]:bounds[s+1]``
    (:func:`pipeline.job.plan.shard_bounds`), so each is checked against those parents' entries
    alone and appended to the level's file — memory is a shard's, not the level's (the US block
    level holds ~40 M entries). The file is the one the whole merged histogram would give."""
    from pipeline.job.plan import shard_bounds
    from pipeline.model.histogram import HistogramRows, HistogramWriter

    parts = [ctx.rd.solved_shard_path(kind, level, s) for s in range(len(infos))]
    out_path = ctx.rd.solved_path(kind, level)
    spec = ctx.spec(kind)
    lv = ctx.geography.level(level)
    i = ctx.level_names.index(level)
    bounds = shard_bounds(ctx, level)
    if len(bounds) - 1 != len(parts):
        raise ConsistencyError(f"{kind} {level}: {len(parts)} shard outputs, the plan has {len(bounds) - 1} shards")
    # the parent level read on a shard's parents at a time (in order: each entry decoded once)
    parents = HistogramRows(ctx.rd.verified(ctx.rd.solved_path(kind, ctx.level_names[i - 1]))) if i > 0 else None
    with HistogramWriter(out_path, level, lv.n_units, spec.n_cells) as out:
        for s, p in enumerate(parts):
            h = SparseHistogram.from_parquet(ctx.rd.verified(p))
            if (h.level, h.n_units, h.n_cells) != (level, lv.n_units, spec.n_cells):
                raise ConsistencyError(f"{kind} {level}: shard {s} holds a {h.level} histogram of "
                                       f"{h.n_units} x {h.n_cells}")
            if parents is not None:
                up = ctx.geography.levels[i - 1]
                p0, p1 = int(bounds[s]), int(bounds[s + 1])
                c0, c1 = int(up.child_ptr[p0]), int(up.child_ptr[p1])
                if h.nnz and (h.unit[0] < c0 or h.unit[-1] >= c1):
                    raise ConsistencyError(f"{kind} {level}: shard {s} holds units outside its parents' children")
                parent = parents.entries(p0, p1)
                if not _sums_match(lv.parent[h.unit], h.cell, h.count, parent):
                    raise ConsistencyError(f"{kind} {level}: children do not add up to the published {parent.level}")
            out.add(h)
    diag = [i_.get("diagnostics", {}) for i_ in infos]
    return {"kind": kind, "level": level, "shards": len(parts), "parents": sum(i_.get("parents", 0) for i_ in infos),
            "units": lv.n_units,
            "iterations": sum(d.get("iterations", 0) for d in diag),
            "max_rel_gap": max((d.get("max_rel_gap", 0.0) for d in diag), default=0.0),
            "fallbacks": sum(d.get("fallbacks", 0) for d in diag),
            "uncertified": sum(d.get("uncertified", 0) for d in diag),
            "seconds": round(sum(i_.get("seconds", 0.0) for i_ in infos), 3)}


def _sums_match(unit: np.ndarray, cell: np.ndarray, count: np.ndarray, b: SparseHistogram) -> bool:
    """Do the (unit, cell, count) entries, summed over repeats, equal histogram ``b`` exactly?"""
    key_a = unit * b.n_cells + cell
    uniq, inv = np.unique(key_a, return_inverse=True)
    sums = np.bincount(inv, weights=count, minlength=uniq.size).astype(np.int64)
    nz = sums != 0
    key_b = b.unit * b.n_cells + b.cell
    return np.array_equal(uniq[nz], key_b) and np.array_equal(sums[nz], b.count)
