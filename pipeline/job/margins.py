"""Simulated margins of error (``output.margins: simulated``): the approximate Monte Carlo method.

The design margins (``pipeline.release.uncertainty``) are those of an unbiased linear estimate;
the published counts are made non-negative, whole and consistent, which makes small counts far
more accurate than the linear estimate (and adds a bias), so one number per line overstates
their error. Here the post-processing itself is simulated, as the Census Bureau's approximate
Monte Carlo method does, using released data only and spending no budget:

1. take the published histograms of every level as a plug-in truth;
2. ``K`` times: draw fresh noise around them with the same design (the exact samplers, seeded
   from a recorded random seed) and run the whole post-processing of this run on it — the same
   estimator, invariants and engine, through the one level loop (``stages.solve_levels``) in a
   scratch run directory;
3. for every published table line, the errors ``rerun − plug-in`` of the ``K`` reruns, pooled
   over the units of a level whose plug-in count is in the same size bin (0, 1–9, 10–49, 50–249,
   250–999, ≥ 1000): ``moe90`` is their 90th percentile of ``|error|`` (an integer); a group with
   fewer than :data:`MIN_ERRORS` errors (few areas at the top levels) takes the quantile of all
   lines of its table at that level and bin. A cell whose every rerun reproduced it exactly (fixed
   by the invariants, a structural zero, a parent of 0) gets 0.

The published ``margins/simulated.parquet`` holds the per (table, level, line, size bin) value;
``dptab verify`` checks every ``moe90`` is that value or 0. The plug-in uses no confidential
data — only the published counts and the declared (public) invariants — so it is post-processing.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.files import private_files, write_parquet_atomic, write_text_atomic
from pipeline.job.context import RunContext, definition_fingerprints
from pipeline.job.prepare import _resolved_config_text
from pipeline.job.rundir import RunDir
from pipeline.model.histogram import SparseHistogram
from pipeline.release.tables import load_tables, tabulate
from pipeline.release.uncertainty import SIZE_BIN_LABELS, size_bin

#: the quantile of |error| a 90% margin is
QUANTILE = 0.9
#: fewest errors a (line, size bin) group's quantile is taken from; smaller groups use the
#: errors of every line of their table at that level and bin
MIN_ERRORS = 50


def _plugin_run(ctx: RunContext, k: int, seed: int) -> RunDir:
    """A scratch run directory whose 'truth' is this run's published histograms: same config,
    seeded noise (``seed + k``), the run's geography and public invariants."""
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.privacy.randomness = "seeded"
    cfg.privacy.seed = seed + k
    cfg.output.runs_dir = ctx.rd.root / "margins"
    rid = f"trial-{k:03d}"
    old = cfg.output.runs_dir / rid
    if old.exists():  # an attempt killed part-way: its reruns are redone from the start
        shutil.rmtree(old)
    rd = RunDir.create(cfg.output.runs_dir, rid, {
        "release_id": rid, "dataset_id": cfg.dataset_id,
        "config_fingerprint": cfg.model_copy(update={"release_id": rid}).run_fingerprint(),
        "definitions": definition_fingerprints(cfg), "randomness": "seeded", "seed": seed + k,
    }, before_state=lambda root: write_text_atomic(root / "config.yaml", _resolved_config_text(cfg, rid)))
    linked = []
    pairs = [(ctx.rd.geography_path, rd.geography_path)]
    pairs += [(ctx.rd.invariants_path(lv), rd.invariants_path(lv)) for lv in ctx.level_names]
    pairs += [(ctx.rd.solved_path(kind, lv), rd.truth_path(kind, lv)) for kind in ctx.kinds for lv in ctx.level_names]
    for src, dst in pairs:
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(ctx.rd.verified(src), dst)
        linked.append(dst)
    rd.mark_done("inputs", ctx.rd.done_info("inputs") or {}, files=linked)
    return rd


def simulate_margins(ctx: RunContext, trials: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The simulated margins: ``(lookup, moving)``. ``lookup``: one row per (table, geolevel,
    line, size bin) with ``moe90`` (int64, persons or housing units) and ``errors`` (how many
    rerun errors it is the quantile of); ``moving``: the cells (table, geolevel, unit, line) that
    some rerun changed — every other cell gets 0 (``pipeline.release.uncertainty.simulated_moe90``)."""
    from pipeline.job.stages import solve_levels

    ts = load_tables(ctx.cfg.tables)
    plug = {kind: {lv: SparseHistogram.from_parquet(ctx.rd.verified(ctx.rd.solved_path(kind, lv)))
                   for lv in ctx.level_names} for kind in ctx.kinds}
    errors: dict[tuple[str, str], list[np.ndarray]] = {}
    for k in range(trials):
        rd = _plugin_run(ctx, k, seed)
        solve_levels(rd.root)
        for kind in ctx.kinds:
            for lv in ctx.level_names:
                rerun = SparseHistogram.from_parquet(rd.verified(rd.solved_path(kind, lv)))
                for t in ts.of_kind(kind):
                    e = tabulate(rerun, t) - tabulate(plug[kind][lv], t)
                    errors.setdefault((t.name, lv), []).append(np.abs(e).astype(np.int64))
        shutil.rmtree(rd.root)
    rows, moved = [], []
    for kind in ctx.kinds:
        for t in ts.of_kind(kind):
            for lv in ctx.level_names:
                counts = tabulate(plug[kind][lv], t)
                stack = np.stack(errors[(t.name, lv)])             # (K, n_units, n_lines)
                moving = stack.max(axis=0) > 0                     # cells some rerun changed
                u, ln = np.nonzero(moving)
                moved.append(pl.DataFrame({"table": pl.repeat(t.name, u.size, dtype=pl.Utf8, eager=True),
                                           "geolevel": pl.repeat(lv, u.size, dtype=pl.Utf8, eager=True),
                                           "unit": u.astype(np.int64),
                                           "line": np.asarray(t.numbers, np.int32)[ln]}))
                bins = size_bin(counts)
                for b in range(len(SIZE_BIN_LABELS)):
                    # the (line, bin) groups of this level's table; a group with fewer than
                    # MIN_ERRORS errors borrows the pooled errors of every line of the table in
                    # the same bin (an empirical 90% quantile of a handful of values is biased low)
                    sel = (bins == b) & moving                      # (n_units, n_lines)
                    if not sel.any():
                        continue
                    pooled = np.sort(stack[:, sel].ravel())
                    for j, line in enumerate(t.numbers):
                        if not sel[:, j].any():
                            continue
                        vals = np.sort(stack[:, sel[:, j], j].ravel())
                        if vals.size < MIN_ERRORS:
                            vals = pooled
                        q = vals[int(np.ceil(QUANTILE * vals.size)) - 1]  # inverted CDF: exact, integer
                        rows.append((t.name, lv, int(line), SIZE_BIN_LABELS[b], int(q), int(vals.size)))
    lookup = pl.DataFrame(rows, schema={"table": pl.Utf8, "geolevel": pl.Utf8, "line": pl.Int32,
                                        "size_bin": pl.Utf8, "moe90": pl.Int64, "errors": pl.Int64}, orient="row")
    return lookup, pl.concat(moved)


def stage_margins(run_dir: str | Path) -> dict[str, Any]:
    """Simulate the margins of error after every level is solved (``output.margins: simulated``);
    writes ``margins/simulated.parquet`` (the per-group values) and ``margins/moving.parquet``
    (the cells some rerun changed) in the run directory."""
    ctx = RunContext.load(run_dir)
    if ctx.cfg.output.margins != "simulated":
        return {}
    if ctx.rd.is_done("margins"):
        return ctx.rd.done_info("margins") or {}
    seed = ctx.state.get("margins_seed")
    if seed is None:
        seed = secrets.randbits(62)
        ctx.rd.update(margins_seed=seed)
    t0 = time.perf_counter()
    with private_files():
        table, moving = simulate_margins(ctx, ctx.cfg.output.margin_trials, int(seed))
        paths = [write_parquet_atomic(table, ctx.rd.simulated_margins_path),
                 write_parquet_atomic(moving, ctx.rd.moving_cells_path)]
    info = {"trials": ctx.cfg.output.margin_trials, "seed": int(seed), "groups": table.height,
            "seconds": round(time.perf_counter() - t0, 3)}
    ctx.rd.mark_done("margins", info, files=paths)
    return info
