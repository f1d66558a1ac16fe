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
  subtree estimate of each measured query, persons); the file metadata ``dptab.variances``
  holds the one variance per query the engine weighs that query with (the targets' own exact
  variances differ by unit and answer; the engine takes one per query, and nothing else reads
  them, so they are not written): the engine's objective is ``Σ_q ||Q_q x − t_q||² / v_q`` per child, so
  the ``1/v_q`` are fitted to make ``Σ_q Q_qᵀQ_q / v_q`` the closest such sum to the exact
  information of the targets (``LevelFit.engine_weights``; for raw measurements it gives back
  their own variances exactly).
- ``estimates/<kind>/<level>/lines.parquet`` (every level but the bottom one; the bottom one
  too when the run simulates its margins of error, ``output.margins: simulated``): ``unit,
  table, line, estimate``: every published table line's BLUE (the release's unbiased tables;
  their standard errors, like the margins of error, follow from the design and the tree alone;
  the simulated margins measure the published counts' bias against them, ``pipeline.job.margins``).
- ``estimates/<kind>/parts/`` (scratch, only while the stage runs): each part's up pass above
  its bottom level (``up-<part>.npz``, :meth:`Upward.to_arrays`) and its rows of the two files
  above, appended in order and removed.

Nothing here is released as is: the release derives its unbiased tables and margins of error
from these files (noisy measurements post-processed, rule 3), never from the truth.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipeline.errors import DptabError
from pipeline.files import private_files, repeated_text
from pipeline.job.context import RunContext
from pipeline.job.executor import Executor
from pipeline.job.plan import shard_bounds
from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.gls import (
    GLSModel,
    LevelFit,
    LevelMeasurements,
    Message,
    Posterior,
    Upward,
    split_parts,
    stack_messages,
)
from pipeline.privacy.measure import load_measurements, read_unit_rows
from pipeline.release.tables import TableDef, load_tables
from pipeline.runtime import return_free_memory

#: the variance standing for "no weight" (the engine needs a positive, finite variance per query)
_NEGLIGIBLE = 1e30


class EstimateError(DptabError, RuntimeError):
    """An estimate file is missing, malformed, or a table line is not a product of attribute sets."""


def _tables(ctx: RunContext, kind: str) -> list[TableDef]:
    return load_tables(ctx.cfg.tables).of_kind(kind)


def _level_files(ctx: RunContext, kind: str, level: str, units: tuple[int, int]) -> list[Any]:
    """The level's measurement files holding some of units ``units`` ``(lo, hi)``, in shard
    order, each checked against its recorded sha256 (a part's worker hashes and opens the files
    of its own subtree, not the whole level's)."""
    bounds = shard_bounds(ctx, level)
    i = ctx.level_names.index(level)
    first = ctx.geography.levels[i - 1].child_ptr[bounds] if i > 0 else np.array([0, 1])  # each shard's first unit
    shards = [s for s in range(len(bounds) - 1) if first[s] < units[1] and first[s + 1] > units[0]]
    return [ctx.rd.verified(ctx.rd.measurement_path(kind, level, s)) for s in shards]


#: the up and down passes below the split level run on at least this many parts (work items of
#: the run's worker pool), and on one per :data:`ESTIMATE_PART_UNITS` bottom units where the tree
#: is larger (a part's fit is held by one worker: a sixteenth of a national tree was ~3 GB; a part
#: is cut at whole units of the split level, so it may hold up to ~3 times its share, or one unit
#: of up to :data:`ESTIMATE_LARGEST_UNIT` blocks). 40,000
#: blocks: about a 30 M-person tree's sixteenth, so a part holds as much from there on whatever
#: the country's size (at 100,000 a 100 M-person part held ~1 GB a worker, at 40,000 ~0.7 GB, and
#: the stage ran faster: more parts, better shared between the workers). The count follows from
#: the tree alone, never from the workers: every executor cuts the same parts and sums them in
#: the same order, so the estimates are bitwise the same on any of them. Nor do they depend on
#: the cut: a unit's targets and line estimates are its own, and the engine's one weight per
#: query is fitted to the level's information summed exactly (``LevelFit.information_sum``).
ESTIMATE_PARTS = 16
ESTIMATE_PART_UNITS = 40_000
#: the most bottom units one unit of the split level may hold where the tree has more parts
#: than :data:`ESTIMATE_PARTS` (above: a part's worker holds ~0.7 GB a 40,000 blocks). Not
#: twice a part's share, as for a small tree: the US-shaped tree asks 141 parts of ~40,000
#: blocks, and two of its counties (the synthetic Los Angeles, 155,010 blocks, and Cook, 93,666)
#: hold more than twice that, which put the split at the 84,444 tracts — and the driver's own
#: pass over every level above the split level, with a message and a posterior per unit, there:
#: the stage peaked at 7.7 GB, and at 2.97 GB cut at the counties by this rule (118 parts, the
#: largest worker 1.3 GB). A county up to this size is a part of its own
#: (balance is kept: such a county is still at most an eighth of the tree, below).
ESTIMATE_LARGEST_UNIT = 200_000


def estimate_parts(n_bottom: int) -> int:
    """How many parts the estimate stage cuts a tree of ``n_bottom`` bottom units into."""
    return max(ESTIMATE_PARTS, -(-n_bottom // ESTIMATE_PART_UNITS))


def estimate_split(levels: Sequence[Any]) -> tuple[int, list[tuple[int, int]]]:
    """The estimate stage's split level and parts (:func:`split_parts`) of a geography's
    ``levels`` (root first; ``child_ptr`` and ``n_units`` of each): :func:`estimate_parts`
    parts, at the shallowest level whose largest unit holds at most twice a part's share of the
    blocks, or — where the tree has more parts than :data:`ESTIMATE_PARTS` — twice the share of
    that many parts (an eighth of the tree: the work stays shared between the workers) but no
    more than :data:`ESTIMATE_LARGEST_UNIT` blocks (a part's memory stays bounded)."""
    n = int(levels[-1].n_units)
    parts = estimate_parts(n)
    largest = max(2 * max(1, n // parts), min(2 * (n // ESTIMATE_PARTS), ESTIMATE_LARGEST_UNIT))
    return split_parts([lv.child_ptr if i + 1 < len(levels) else None for i, lv in enumerate(levels)],
                       [int(lv.n_units) for lv in levels], parts, largest=largest)


def _subtree(ctx: RunContext, kind: str, k: int, lo: int, hi: int, stop: int | None = None,
             summed_leaves: bool = False) -> tuple[list[LevelMeasurements], list[tuple[int, int]]]:
    """The measurements of units ``lo:hi`` of level ``k`` and everything below them down to
    level ``stop - 1`` (default: the bottom; levels ``k..stop-1``, child pointers rebased) and
    the unit range ``(lo, hi)`` of the part at each of those levels. ``summed_leaves``: the
    bottom level's (below ``k``) summed per parent as they are read (``LevelMeasurements.summed``:
    for an up pass without leaf means; the leaves' matrix, the largest of a part, is never made)."""
    spec, strategy, levels = ctx.spec(kind), ctx.strategies[kind], ctx.geography.levels
    out, ranges = [], []
    ptr = None
    for i in range(k, len(levels) if stop is None else stop):
        lv = levels[i]
        summed = summed_leaves and ptr is not None and i == len(levels) - 1
        meas = load_measurements(_level_files(ctx, kind, lv.name, (lo, hi)), spec, lo, hi,
                                 queries=list(strategy.queries(lv.name)), sum_by=ptr[:-1] if summed else None)
        out.append(LevelMeasurements(ptr, {q: (m.values, m.variance) for q, m in meas.items()}, lv.name, summed))
        ranges.append((lo, hi))
        if i + 1 < len(levels):
            full = lv.child_ptr
            ptr = full[lo:hi + 1] - full[lo]
            lo, hi = int(full[lo]), int(full[hi])
    return out, ranges


def _write_scratch(table: pa.Table, path: Path) -> None:
    """A part's rows for the stage to append: Arrow IPC, uncompressed (read back once, in the
    same run; a fifth of the cost of writing and reading them as Parquet)."""
    feather.write_feather(table, path, compression="uncompressed")


def _read_scratch(path: Path) -> pa.Table:
    return feather.read_table(path, memory_map=False)

#: (kind, queries, spec name) -> GLSModel, per process (a worker fits many parts of one run)
_MODELS: dict[tuple[str, tuple[str, ...], str], GLSModel] = {}


def _model(ctx: RunContext, kind: str) -> GLSModel:
    queries = tuple(q for lv in ctx.geography.levels for q in ctx.strategies[kind].queries(lv.name))
    key = (kind, queries, ctx.spec(kind).name)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = GLSModel(ctx.spec(kind), list(queries))
    return _MODELS[key]


def _inner(ctx: RunContext) -> range:
    """Levels with targets below the root: every level but the bottom."""
    return range(1, len(ctx.geography.levels) - 1)


def _bottom_lines(ctx: RunContext) -> bool:
    """Whether the bottom level's line estimates are made too: only the simulated margins of
    error need them (the bias of the published counts, ``pipeline.job.margins``); they cost the
    leaves' change of basis, which the up pass otherwise skips."""
    return ctx.cfg.output.margins == "simulated"


def _part_up(item: tuple[str, str, int, int, int, int]) -> tuple[Any, Any, dict[int, list[np.ndarray]]]:
    """Pass (1) for one part (a work item): ``(run_dir, kind, k, lo, hi, part)`` -> the part's
    message to the level above (``info``, ``h`` arrays per component, units ``lo:hi`` of level
    ``k``) and the sums of the information matrices of its units at each level with targets. The
    bottom level's own estimates are not made (no target or line needs them: its parents get
    their children's sums from summed measurements, :meth:`GLSModel.upward`'s ``leaf_means``);
    what pass (3) needs of the up pass — every boundary but the one into the bottom level — is
    saved to the part's file."""
    run_dir, kind, k, lo, hi, part = item
    ctx = RunContext.load(run_dir)
    sub, _ = _subtree(ctx, kind, k, lo, hi, summed_leaves=True)
    up = _model(ctx, kind).upward(sub, leaf_means=False)  # no target or line needs the bottom's own
    info = {i: (up.message.subtree_fit() if i == k else up.subtree(i - k)).information_sum()
            for i in _inner(ctx) if i >= k}
    if up.bounds and not _bottom_lines(ctx):  # else pass (3) runs the part's up pass again
        path = ctx.rd.estimate_parts_dir(kind) / f"up-{part:05d}.npz"
        with private_files():  # confidential, like every run file (a worker's umask is its own)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **up.above_bottom().to_arrays())
    return up.message.info, up.message.h, info


def _part_down(item: tuple[str, str, int, int, int, int, Any, Any]) -> dict[int, tuple[Path | None, Path]]:
    """Pass (3) for one part: ``(run_dir, kind, k, lo, hi, part, mean, cov)`` with the posterior
    of its top units from the fit above -> its rows of every level's targets and line estimates,
    written to part files (``{level index: (targets part or None, lines part)}``; the stage
    appends them in order). The up pass is pass (1)'s, read back without its bottom boundary —
    or, when the bottom level's lines are made (:func:`_bottom_lines`), run again here with the
    leaves' means, so that no pass writes the leaves' arrays (the largest part of a pass) to disk."""
    run_dir, kind, k, lo, hi, part, mean, cov = item
    ctx = RunContext.load(run_dir)
    model = _model(ctx, kind)
    levels, queries = ctx.geography.levels, ctx.strategies[kind].queries
    bottom = len(levels) - 1
    mine = [i for i in _inner(ctx) if i >= k]
    lined = mine + ([bottom] if _bottom_lines(ctx) else [])
    if not lined:
        return {}
    parts = ctx.rd.estimate_parts_dir(kind)
    top = Posterior(model, tuple(mean), tuple(cov))
    if k == bottom:  # the parts are bottom units: their posterior is the fit above's
        fits = [LevelFit(model, top)]
        up = None
    elif bottom in lined:
        sub, _ = _subtree(ctx, kind, k, lo, hi)
        up = model.upward(sub)
        fits = list(model.downward(up, top).levels)
    else:
        with np.load(parts / f"up-{part:05d}.npz") as z:
            up = Upward.from_arrays(model, z)
        fits = list(model.downward(up, top).levels)
    tables = _tables(ctx, kind)
    out: dict[int, tuple[Path | None, Path]] = {}
    first = lo
    for i in range(k, bottom + 1):
        if i > k:
            first = int(levels[i - 1].child_ptr[first])
        if i not in lined:
            continue
        paths = (parts / f"targets-{i}-{part:05d}.arrow", parts / f"lines-{i}-{part:05d}.arrow")
        with private_files():  # confidential scratch, like every run file
            parts.mkdir(parents=True, exist_ok=True)  # (pass (1) made it only if it saved an up pass)
            if i in mine:
                assert up is not None
                fit_i = up.message.subtree_fit() if i == k else up.subtree(i - k)
                _write_scratch(_target_rows(fit_i, queries(levels[i].name), first), paths[0])
            _write_scratch(_line_rows(fits[i - k], tables, first), paths[1])
        out[i] = (paths[0] if i in mine else None, paths[1])
    return out


def _part_down_trimmed(item: tuple[str, str, int, int, int, int, Any, Any]) -> dict[int, tuple[Path | None, Path]]:
    """:func:`_part_down`, then every page its worker freed back to the system. A pool worker
    otherwise keeps up to ``runtime.WORKER_KEEP_FREE_BYTES`` of freed heap for its next task —
    the next level's shards, after this stage: with parts of 40,000 blocks a 100 M-person run's
    two workers left the stage holding ~0.7 GB each, nearly all of it free, and kept it through
    the tract and block-group levels (748 and 700 MB sampled there, 0.5–0.6 GB each in a run whose
    larger parts had freed more than the allowance, which is then all given back)."""
    written = _part_down(item)
    return_free_memory()
    return written


def estimate_kind(ctx: RunContext, kind: str, executor: Executor) -> tuple[dict[str, Any], list[Any]]:
    """Fit the GLS over every level of ``kind`` and write the estimate files; returns the stage
    manifest (no data values) and the files written.

    The tree is cut at a split level ``k`` into parts (:func:`split_parts`: subtrees of
    consecutive level-``k`` units), each a work item of ``executor`` (the run's worker pool;
    one part's subtree in a worker's memory at a time): (1) per part, the up pass — its message
    to the level above, and the sums of the information matrices the engine weights are fitted
    to; (2) here, levels ``0..k-1``: their own measurements with every part's message, the down
    pass over them and the posterior of each level-``k`` unit; (3) per part again, the down pass
    from its posterior (over pass (1)'s saved up pass), writing its units' targets and line
    estimates to part files, which are appended to each level's files in unit order."""
    t0 = time.perf_counter()
    strategy, levels = ctx.strategies[kind], ctx.geography.levels
    if len(levels) < 2:
        raise EstimateError("the full estimator needs a hierarchy of at least two levels")
    k, ranges = estimate_split(levels)
    # a part's worker checks the files its subtree reads against their recorded sha256 before
    # it reads them (publishing checks every file again as it copies it): none is read unchecked
    model = _model(ctx, kind)
    inner = _inner(ctx)
    run_dir = str(ctx.rd.root)
    shutil.rmtree(ctx.rd.estimate_parts_dir(kind), ignore_errors=True)  # an attempt killed part-way
    ups = executor.map(_part_up, [(run_dir, kind, k, lo, hi, p) for p, (lo, hi) in enumerate(ranges)])  # (1)
    info_sum: dict[int, list[np.ndarray]] = {}
    for _, _, info in ups:
        for i, add in info.items():
            info_sum[i] = add if i not in info_sum else [a + b for a, b in zip(info_sum[i], add)]
    below = stack_messages([Message(model, info, h) for info, h, _ in ups])
    del ups
    above, _ = _subtree(ctx, kind, 0, 0, 1, stop=k)  # the whole tree above the split level
    upper = model.upward(above, below=below, below_child_ptr=levels[k - 1].child_ptr)  # (2)
    top_fit = model.downward(upper)
    assert top_fit.below is not None
    for i in inner:
        if i < k:
            info_sum[i] = upper.subtree(i).information_sum()
    weights = {i: _weights(strategy.queries(levels[i].name), top_fit.levels[0], info_sum[i], int(levels[i].n_units))
               for i in inner}
    weights[0] = _weights(strategy.queries(levels[0].name), top_fit.levels[0], None, 1)
    tables = _tables(ctx, kind)
    targets = {i: _Appender(ctx.rd.estimate_targets_path(kind, levels[i].name), {"dptab.variances": weights[i]})
               for i in [0, *inner]}
    lined = [0, *inner] + ([len(levels) - 1] if _bottom_lines(ctx) else [])
    lines = {i: _Appender(ctx.rd.estimate_lines_path(kind, levels[i].name)) for i in lined}
    try:
        targets[0].add(_target_rows(top_fit.levels[0], strategy.queries(levels[0].name), 0))
        lines[0].add(_line_rows(top_fit.levels[0], tables, 0))
        for i in inner:
            if i < k:
                targets[i].add(_target_rows(upper.subtree(i), strategy.queries(levels[i].name), 0))
                lines[i].add(_line_rows(top_fit.levels[i], tables, 0))
        post = top_fit.below
        tops = [post.select(lo, hi) for lo, hi in ranges]  # each part's top units' posterior
        # (3), each part's rows appended while the pool computes the parts after it
        for written in executor.imap(_part_down_trimmed, [(run_dir, kind, k, lo, hi, p, top.mean, top.cov)
                                                  for p, ((lo, hi), top) in enumerate(zip(ranges, tops))]):
            for i, (tpath, lpath) in sorted(written.items()):
                if tpath is not None:
                    targets[i].add(_read_scratch(tpath))
                lines[i].add(_read_scratch(lpath))
    finally:
        files = [a.close() for a in [*targets.values(), *lines.values()]]
        shutil.rmtree(ctx.rd.estimate_parts_dir(kind), ignore_errors=True)
    return {"kind": kind, "levels": len(levels), "split_level": levels[k].name, "parts": len(ranges),
            "seconds": round(time.perf_counter() - t0, 3)}, files


def _weights(queries: tuple[str, ...], fit: Any, information: list[np.ndarray] | None, units: int) -> dict[str, float]:
    """The engine's one variance per query (``1/w``; negligible weight: :data:`_NEGLIGIBLE`)."""
    w = fit.engine_weights(queries, information, units) if information is not None else fit.engine_weights(queries)
    return {q: 1.0 / x if x > 0 else _NEGLIGIBLE for q, x in w.items()}


def _target_rows(fit: Any, queries: tuple[str, ...], first_unit: int) -> pa.Table:
    """``unit, query, answer, value`` of every measured query of the fit's units."""
    parts = []
    for q in queries:
        a = fit.query(q)
        n, na = a.shape
        parts.append(pa.table({
            "unit": np.repeat(np.arange(first_unit, first_unit + n, dtype=np.int64), na),
            "query": repeated_text(q, n * na),
            "answer": np.tile(np.arange(na, dtype=np.int32), n),
            "value": a.reshape(-1)}))
    return pa.concat_tables(parts).unify_dictionaries()


def _line_rows(fit: Any, tables: list[TableDef], first_unit: int) -> pa.Table:
    """``unit, table, line, estimate`` of every table line of the fit's units (the BLUE)."""
    parts = []
    for t in tables:
        values = np.asarray((t.matrix.astype(np.float64) @ fit.estimate.T).T)  # (n_units, n_lines)
        n = values.shape[0]
        parts.append(pa.table({
            "unit": np.repeat(np.arange(first_unit, first_unit + n, dtype=np.int64), t.n_lines),
            "table": repeated_text(t.name, n * t.n_lines),
            "line": np.tile(np.asarray(t.numbers, np.int32), n),
            "estimate": values.reshape(-1)}))
    return pa.concat_tables(parts).unify_dictionaries()


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
            # dictionaries on the text columns (one value a query or table), delta-coded integer
            # columns; the float estimates are all distinct, so zstd would only cost time on them.
            # Without the Arrow schema the text columns read back as plain strings
            fields = [(f.name, f.type) for f in table.schema]
            self.writer = pq.ParquetWriter(
                self.tmp, table.schema, store_schema=False,
                use_dictionary=[n for n, t in fields if pa.types.is_dictionary(t)],
                compression={n: "none" if pa.types.is_floating(t) else "zstd" for n, t in fields},
                column_encoding={n: "DELTA_BINARY_PACKED" for n, t in fields if pa.types.is_integer(t)})
            self.writer.add_key_value_metadata(self.meta)
        self.writer.write_table(table.replace_schema_metadata(None))

    def close(self) -> Path:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)
        return self.path


class LineEstimates(Mapping[tuple[str, str], np.ndarray]):
    """The full estimator's line estimates of some run kinds, read from the run directory when
    asked: ``m[(table, level)]`` is float ``(n_units, n_lines)``. Nothing is held: each lookup
    reads that table's rows of the level's ``lines.parquet`` (the release writes one (table,
    level) at a time, so it never holds the country's estimates at once; a national block-group
    level's file is ~70 M rows, of which one table's ``estimate`` column is read)."""

    def __init__(self, ctx: RunContext, kinds: Sequence[str], bottom: bool = False) -> None:
        self._rd = ctx.rd
        levels = ctx.geography.levels if bottom else ctx.geography.levels[:-1]
        # (table, level) -> (kind, units, lines), in the order the files hold them
        self._keys = {(t.name, lv.name): (kind, lv.n_units, t.n_lines)
                      for kind in kinds for lv in levels for t in _tables(ctx, kind)}

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._keys)

    def __getitem__(self, key: tuple[str, str]) -> np.ndarray:
        kind, n_units, n_lines = self._keys[key]
        table, level = key
        scan = pl.scan_parquet(self._rd.verified(self._rd.estimate_lines_path(kind, level)))
        est = scan.filter(pl.col("table") == table).select("estimate").collect()["estimate"]
        if est.len() != n_units * n_lines:
            raise EstimateError(f"{kind} {level}: {est.len()} line estimates of {table}, expected "
                                f"{n_units * n_lines}")
        return est.to_numpy().reshape(n_units, n_lines)


def read_targets(path: Any, spec: HistogramSpec, c0: int, c1: int,
                 queries: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The engine's targets for units ``c0:c1`` from a level's targets file: per query the float
    ``(c1 - c0, n_answers)`` subtree estimate, and the one variance per query it is weighed with.

    Read by the measurements' reader (``privacy.measure.read_unit_rows``): only the row groups of
    the range, once for every query, one at a time. (A polars scan filtered per query decoded the
    range's row groups once per query, all at once: a 100 M-person block-group shard's driver rose
    by ~0.4 GB while it read.)"""
    meta = pq.read_schema(path).metadata or {}
    try:
        weights = json.loads(meta[b"dptab.variances"])
    except KeyError:
        raise EstimateError(f"{path}: not an estimate file") from None
    targets = read_unit_rows(path, {q: spec.query(q).n_answers for q in queries}, c0, c1)
    for q, vals in targets.items():
        missing = int(np.isnan(vals).sum())
        if missing:
            raise EstimateError(f"{path}: {missing} of {vals.size} estimates of query {q!r} for units {c0}:{c1} "
                                "are missing")
    return targets, {q: float(weights[q]) for q in queries}
