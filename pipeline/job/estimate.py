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

- ``estimates/<kind>/<level>/shard-<s>.parquet`` (every level but the bottom one): the engine's
  targets for the children of shard ``s`` of ``level`` — ``unit, query, answer, value`` (the
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
import time
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DptabError
from pipeline.files import write_parquet_atomic
from pipeline.job.context import RunContext
from pipeline.job.plan import shard_bounds
from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.gls import GLSModel, LevelMeasurements
from pipeline.privacy.measure import load_measurements
from pipeline.release.tables import TableDef, load_tables

#: the variance standing for "no weight" (the engine needs a positive, finite variance per query)
_NEGLIGIBLE = 1e30


class EstimateError(DptabError, RuntimeError):
    """An estimate file is missing, malformed, or a table line is not a product of attribute sets."""


def _tables(ctx: RunContext, kind: str) -> list[TableDef]:
    return load_tables("pl94").of_kind(kind)


def estimate_kind(ctx: RunContext, kind: str) -> tuple[dict[str, Any], list[Any]]:
    """Fit the GLS over every level of ``kind`` and write the estimate files; returns the stage
    manifest (no data values) and the files written."""
    t0 = time.perf_counter()
    spec = ctx.spec(kind)
    strategy = ctx.strategies[kind]
    levels = ctx.geography.levels
    data = []
    for i, lv in enumerate(levels):
        queries = strategy.queries(lv.name)
        files = [ctx.rd.verified(ctx.rd.measurement_path(kind, lv.name, s))
                 for s in range(len(shard_bounds(ctx, lv.name)) - 1)]
        meas = load_measurements(files, spec, 0, int(lv.n_units), queries=list(queries))
        data.append(LevelMeasurements(
            child_ptr=None if i == 0 else levels[i - 1].child_ptr,
            measured={q: (m.values, m.variance) for q, m in meas.items()}))
    model = GLSModel(spec, [q for d in data for q in d.measured])
    up = model.upward(data)
    gls = model.downward(up)
    written = []
    tables = _tables(ctx, kind)
    for i, lv in enumerate(levels):
        est = gls.levels[i]
        if i < len(levels) - 1:  # the bottom level's targets are its own measurements (see above)
            sub = est if i == 0 else up.subtree(i)
            queries = strategy.queries(lv.name)
            answers = {q: sub.query(q) for q in queries}
            variances = {q: sub.query_variance(q) for q in queries}
            # the engine weighs query q by 1/weights[q]: the per-query weights closest to the
            # exact information of the targets (a query the fit gives no weight: negligible)
            weights = {q: 1.0 / w if w > 0 else _NEGLIGIBLE for q, w in sub.engine_weights(queries).items()}
            bounds = shard_bounds(ctx, lv.name)
            for s in range(len(bounds) - 1):
                c0, c1 = _children(ctx, i, bounds, s)
                path = ctx.rd.estimate_path(kind, lv.name, s)
                _write_targets(path, c0, c1, answers, variances, weights)
                written.append(path)
        if i < len(levels) - 1 and tables:  # the unbiased tables: every level but the bottom one
            frames = []
            for t in tables:
                values = np.asarray((t.matrix.astype(np.float64) @ est.estimate.T).T)  # (n_units, n_lines)
                frames.append(pl.DataFrame({
                    "unit": np.repeat(np.arange(lv.n_units, dtype=np.int64), t.n_lines),
                    "table": pl.repeat(t.name, lv.n_units * t.n_lines, dtype=pl.Utf8, eager=True),
                    "line": np.tile(np.asarray(t.numbers, np.int32), lv.n_units),
                    "estimate": values.reshape(-1)}))
            lines_path = ctx.rd.estimate_lines_path(kind, lv.name)
            write_parquet_atomic(pl.concat(frames), lines_path)
            written.append(lines_path)
    return {"kind": kind, "levels": len(levels), "seconds": round(time.perf_counter() - t0, 3)}, written


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


def _children(ctx: RunContext, i: int, bounds: np.ndarray, s: int) -> tuple[int, int]:
    """The unit range of level ``i`` that shard ``s`` solves."""
    if i == 0:
        return 0, 1
    plv = ctx.geography.levels[i - 1]
    return int(plv.child_ptr[bounds[s]]), int(plv.child_ptr[bounds[s + 1]])


def _write_targets(path: Any, c0: int, c1: int, answers: dict[str, np.ndarray], variances: dict[str, np.ndarray],
                   weights: dict[str, float]) -> None:
    parts = []
    for q, a in answers.items():
        block = a[c0:c1]
        n, na = block.shape
        parts.append(pa.table({
            "unit": np.repeat(np.arange(c0, c1, dtype=np.int64), na),
            "query": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n * na, np.int32)), pa.array([q])),
            "answer": np.tile(np.arange(na, dtype=np.int32), n),
            "value": block.reshape(-1),
            "variance": variances[q][c0:c1].reshape(-1)}))
    table = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})
    table = table.replace_schema_metadata({b"dptab.variances": json.dumps(weights).encode(),
                                           b"dptab.units": f"{c0}:{c1}".encode()})
    write_parquet_atomic(table, path)


def read_targets(path: Any, spec: HistogramSpec, c0: int, c1: int,
                 queries: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The engine's targets for units ``c0:c1`` from one estimate shard file: per query the
    float ``(c1 - c0, n_answers)`` BLUE, and the one variance per query it is weighed with."""
    meta = pq.read_schema(path).metadata or {}
    try:
        weights = json.loads(meta[b"dptab.variances"])
        if meta[b"dptab.units"].decode() != f"{c0}:{c1}":
            raise EstimateError(f"{path}: made for units {meta[b'dptab.units'].decode()}, not {c0}:{c1}")
    except KeyError:
        raise EstimateError(f"{path}: not an estimate file") from None
    df = pl.read_parquet(path)
    parts = {k[0]: v for k, v in df.partition_by("query", as_dict=True).items()}
    targets = {}
    for q in queries:
        na = spec.query(q).n_answers
        part = parts.get(q)
        if part is None or part.height != (c1 - c0) * na:
            raise EstimateError(f"{path}: no complete estimates of query {q!r}")
        targets[q] = part["value"].to_numpy().reshape(c1 - c0, na)
    return targets, {q: float(weights[q]) for q in queries}
