"""The full-information estimator's stage (``postprocess.estimator: full``): every level's noisy
measurements of one run kind → the hierarchical GLS (BLUE) fit → targets for the top-down engine
and per-line estimates with exact variances for the release.

Order in the run (``pipeline.job.plan``): measure every shard of every level (every answer drawn:
this estimator uses all levels at once, so nothing may be skipped on a parent's answer), then this
stage once per run kind, then the same top-down solve as the ``topdown`` estimator.

What the top-down engine is given. It solves each parent's children with the parent's published
answer held fixed. Given its parent, a unit's best estimate uses its own measurements and those
of its whole subtree — the data above it adds nothing once the parent is fixed — and the subtree
estimates ``z_u`` of siblings are independent. So the engine's targets for a unit are ``z_u``
(the GLS up pass's estimate from the unit's subtree: its own and every descendant's
measurements) with the variances of ``z_u``; without the constraints the engine then returns
exactly the GLS estimate conditioned on the published parent. At the bottom level a unit's
subtree is itself, ``z_u`` is its own least-squares estimate, and the unit's raw measurements
with their exact variances give the engine exactly the right objective — so the bottom level
keeps them (as ``topdown`` does). The root's target is the full GLS estimate. TopDown differs
only in leaving out the subtree: a county's target there is its own measurements alone.

Files (run directory, confidential; each recorded with its checksum in ``state.json``):

- ``estimates/<kind>/<level>/targets.parquet`` (every level but the bottom one): the engine's
  targets for the units of ``level`` — ``unit, query, answer, value`` (the
  subtree estimate of each measured query, persons) and ``variance`` (its exact variance,
  persons²); the file metadata ``dptab.variances`` holds the one variance per query the engine
  weighs that query with: the engine's objective is ``Σ_q ||Q_q x − t_q||² / v_q`` per child, so
  the ``1/v_q`` are fitted to make ``Σ_q Q_qᵀQ_q / v_q`` the closest such sum to the exact
  information of the targets (``LevelFit.engine_weights``; for raw measurements it gives back
  their own variances exactly).
- ``estimates/<kind>/<level>/lines.parquet`` (every level but the bottom one): ``unit, table,
  line, estimate``: every published table line's BLUE (the release's unbiased tables; their
  standard errors, like the margins of error, follow from the design and the tree alone).

Nothing here is released as is: the release derives its unbiased tables and margins of error
from these files (noisy measurements post-processed, rule 3), never from the truth.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DptabError
from pipeline.job.context import RunContext
from pipeline.job.plan import shard_bounds
from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.gls import GLSModel, LevelMeasurements, stack_messages
from pipeline.privacy.measure import load_measurements
from pipeline.release.tables import TableDef, load_tables

#: the variance standing for "no weight" (the engine needs a positive, finite variance per query)
_NEGLIGIBLE = 1e30


class EstimateError(DptabError, RuntimeError):
    """An estimate file is missing, malformed, or a table line is not a product of attribute sets."""


def _tables(ctx: RunContext, kind: str) -> list[TableDef]:
    return load_tables(ctx.cfg.tables).of_kind(kind)


def _level_files(ctx: RunContext, kind: str, level: str) -> list[Any]:
    return [ctx.rd.verified(ctx.rd.measurement_path(kind, level, s)) for s in range(len(shard_bounds(ctx, level)) - 1)]


def _subtree(ctx: RunContext, kind: str, top: int) -> tuple[list[LevelMeasurements], list[tuple[int, int]]]:
    """The measurements of unit ``top`` of level 1 and everything below it (levels 1..L-1, child
    pointers rebased) and the unit range ``(lo, hi)`` of the subtree at each of those levels."""
    spec, strategy, levels = ctx.spec(kind), ctx.strategies[kind], ctx.geography.levels
    out, ranges = [], []
    lo, hi, ptr = top, top + 1, None
    for i in range(1, len(levels)):
        lv = levels[i]
        meas = load_measurements(_level_files(ctx, kind, lv.name), spec, lo, hi, queries=list(strategy.queries(lv.name)))
        out.append(LevelMeasurements(ptr, {q: (m.values, m.variance) for q, m in meas.items()}, lv.name))
        ranges.append((lo, hi))
        if i + 1 < len(levels):
            full = lv.child_ptr
            ptr = full[lo:hi + 1] - full[lo]
            lo, hi = int(full[lo]), int(full[hi])
    return out, ranges


def estimate_kind(ctx: RunContext, kind: str) -> tuple[dict[str, Any], list[Any]]:
    """Fit the GLS over every level of ``kind``, streaming by subtree of the level below the root
    (a state), and write the estimate files; returns the stage manifest (no data values) and the
    files written.

    Three passes keep one state's subtree in memory at a time: (1) per state, the up pass — its
    message to the root, and the sums of the information matrices the engine weights are fitted
    to; (2) the root: its own measurements with every state's message, and the posterior of each
    state; (3) per state again, the up pass (recomputed rather than held) and the down pass from
    its posterior, appending its units' targets and line estimates to each level's files in unit
    order."""
    t0 = time.perf_counter()
    spec, strategy, levels = ctx.spec(kind), ctx.strategies[kind], ctx.geography.levels
    if len(levels) < 2:
        raise EstimateError("the full estimator needs a hierarchy of at least two levels")
    n_top = int(levels[1].n_units)
    root_meas = load_measurements(_level_files(ctx, kind, levels[0].name), spec, 0, 1,
                                  queries=list(strategy.queries(levels[0].name)))
    root = LevelMeasurements(None, {q: (m.values, m.variance) for q, m in root_meas.items()}, levels[0].name)
    model = GLSModel(spec, [q for lv in levels for q in strategy.queries(lv.name)])
    inner = range(1, len(levels) - 1)  # levels with targets below the root: every level but the bottom
    info_sum: dict[int, list[np.ndarray]] = {}
    messages = []
    # With one subtree (a one-state release) pass (3) would redo exactly pass (1)'s reading and up
    # pass: that subtree is kept instead (no more memory than pass (3) holds anyway). With several,
    # keeping them all would hold the whole country; they are recomputed.
    held: tuple[list[LevelMeasurements], list[tuple[int, int]], Any] | None = None
    for s in range(n_top):  # (1)
        sub, ranges = _subtree(ctx, kind, s)
        up = model.upward(sub)
        messages.append(up.message)
        for i in inner:
            part = up.message.subtree_fit() if i == 1 else up.subtree(i - 1)
            add = part.information_sum()
            info_sum[i] = add if i not in info_sum else [a + b for a, b in zip(info_sum[i], add)]
        if n_top == 1:
            held = (sub, ranges, up)
        del up, sub
    top = model.upward([root], below=stack_messages(messages), below_child_ptr=levels[0].child_ptr)  # (2)
    top_fit = model.downward(top)
    assert top_fit.below is not None
    weights = {i: _weights(strategy.queries(levels[i].name), top_fit.levels[0], info_sum[i], int(levels[i].n_units))
               for i in inner}
    weights[0] = _weights(strategy.queries(levels[0].name), top_fit.levels[0], None, 1)
    tables = _tables(ctx, kind)
    targets = {i: _Appender(ctx.rd.estimate_targets_path(kind, levels[i].name), {"dptab.variances": weights[i]})
               for i in [0, *inner]}
    lines = {i: _Appender(ctx.rd.estimate_lines_path(kind, levels[i].name)) for i in [0, *inner]}
    try:
        root_fit = top_fit.levels[0]
        targets[0].add(_target_rows(root_fit, strategy.queries(levels[0].name), 0))
        lines[0].add(_line_rows(root_fit, tables, 0))
        for s in range(n_top):  # (3)
            if held is not None:
                sub, ranges, up = held
                held = None
            else:
                sub, ranges = _subtree(ctx, kind, s)
                up = model.upward(sub)
            fit = model.downward(up, top_fit.below.select(s, s + 1))
            for i in inner:
                part = up.message.subtree_fit() if i == 1 else up.subtree(i - 1)
                lo = ranges[i - 1][0]
                targets[i].add(_target_rows(part, strategy.queries(levels[i].name), lo))
                lines[i].add(_line_rows(fit.levels[i - 1], tables, lo))
            del up, fit, sub
    finally:
        written = [a.close() for a in [*targets.values(), *lines.values()]]
    return {"kind": kind, "levels": len(levels), "subtrees": n_top,
            "seconds": round(time.perf_counter() - t0, 3)}, written


def _weights(queries: tuple[str, ...], fit: Any, information: list[np.ndarray] | None, units: int) -> dict[str, float]:
    """The engine's one variance per query (``1/w``; negligible weight: :data:`_NEGLIGIBLE`)."""
    w = fit.engine_weights(queries, information, units) if information is not None else fit.engine_weights(queries)
    return {q: 1.0 / x if x > 0 else _NEGLIGIBLE for q, x in w.items()}


def _target_rows(fit: Any, queries: tuple[str, ...], first_unit: int) -> pa.Table:
    """``unit, query, answer, value, variance`` of every measured query of the fit's units."""
    parts = []
    for q in queries:
        a, v = fit.query(q), fit.query_variance(q)
        n, na = a.shape
        parts.append(pa.table({
            "unit": np.repeat(np.arange(first_unit, first_unit + n, dtype=np.int64), na),
            "query": pa.array(np.full(n * na, q, dtype=object), pa.string()),
            "answer": np.tile(np.arange(na, dtype=np.int32), n),
            "value": a.reshape(-1), "variance": v.reshape(-1)}))
    return pa.concat_tables(parts)


def _line_rows(fit: Any, tables: list[TableDef], first_unit: int) -> pa.Table:
    """``unit, table, line, estimate`` of every table line of the fit's units (the BLUE)."""
    frames = []
    for t in tables:
        values = np.asarray((t.matrix.astype(np.float64) @ fit.estimate.T).T)  # (n_units, n_lines)
        n = values.shape[0]
        frames.append(pl.DataFrame({
            "unit": np.repeat(np.arange(first_unit, first_unit + n, dtype=np.int64), t.n_lines),
            "table": pl.repeat(t.name, n * t.n_lines, dtype=pl.Utf8, eager=True),
            "line": np.tile(np.asarray(t.numbers, np.int32), n),
            "estimate": values.reshape(-1)}))
    return pl.concat(frames).to_arrow()


class _Appender:
    """One Parquet file written part by part (in unit order), atomically: a temporary file
    renamed into place on :meth:`close`; ``meta``: JSON values for the file's key-value metadata."""

    def __init__(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.meta = {k.encode(): json.dumps(v).encode() for k, v in (meta or {}).items()}
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata(self.meta), compression="zstd")
        self.writer.write_table(table.replace_schema_metadata(self.meta))

    def close(self) -> Path:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)
        return self.path


def read_line_estimates(ctx: RunContext, kind: str) -> dict[tuple[str, str], np.ndarray]:
    """The full estimator's line estimates of ``kind``: ``{(table, level): float (n_units, n_lines)}``
    for every level but the bottom one (the release's unbiased tables)."""
    out = {}
    levels = ctx.geography.levels
    for lv in levels[:-1]:
        df = pl.read_parquet(ctx.rd.verified(ctx.rd.estimate_lines_path(kind, lv.name)))
        for t in _tables(ctx, kind):
            part = df.filter(pl.col("table") == t.name)
            if part.height != lv.n_units * t.n_lines:
                raise EstimateError(f"{kind} {lv.name}: {part.height} line estimates of {t.name}, expected "
                                    f"{lv.n_units * t.n_lines}")
            out[(t.name, lv.name)] = part["estimate"].to_numpy().reshape(lv.n_units, t.n_lines)
    return out


def read_targets(path: Any, spec: HistogramSpec, c0: int, c1: int,
                 queries: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The engine's targets for units ``c0:c1`` from a level's targets file: per query the float
    ``(c1 - c0, n_answers)`` subtree estimate, and the one variance per query it is weighed with."""
    meta = pq.read_schema(path).metadata or {}
    try:
        weights = json.loads(meta[b"dptab.variances"])
    except KeyError:
        raise EstimateError(f"{path}: not an estimate file") from None
    lf = pl.scan_parquet(path).filter((pl.col("unit") >= c0) & (pl.col("unit") < c1))
    targets = {}
    for q in queries:
        na = spec.query(q).n_answers
        part = lf.filter(pl.col("query") == q).select("unit", "answer", "value").collect()
        if part.height != (c1 - c0) * na:
            raise EstimateError(f"{path}: {part.height} estimates of query {q!r} for units {c0}:{c1}, "
                                f"expected {(c1 - c0) * na}")
        vals = np.empty((c1 - c0, na))
        vals[part["unit"].to_numpy() - c0, part["answer"].to_numpy()] = part["value"].to_numpy()
        targets[q] = vals
    return targets, {q: float(weights[q]) for q in queries}
