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
   by the invariants, a structural zero, a parent of 0) gets 0;

   with the full estimator, a non-zero group's errors are first moved by its **bias shift**: the
   plug-in is the published histogram, which is denser across areas and sparser inside large ones
   than the truth (the post-processing spreads counts into empty cells and hides small ones), so
   the reruns reproduce only part of the published counts' bias — about half of the large blocks'
   (ACCURACY.md). The bias itself is measured against the unbiased GLS estimate ``g`` of the same
   lines (``pipeline.job.estimate``, made for the bottom level too when margins are simulated):
   over a group's cells, ``mean(published − g)`` estimates ``E[published − truth]`` up to the
   GLS noise of the cells the size bin selects, ``E[g − truth | bin]``, which the reruns measure
   as ``mean(g* − plug-in)`` over the cells each rerun published in the bin (``g*``: the rerun's
   own GLS estimate). The group's errors are shifted by the whole persons nearest to that bias
   minus their own mean (a shift under half a person moves nothing), from a group of at least
   :data:`MIN_BIAS_CELLS` cells (else the table's cells at that level and bin). The ``topdown``
   estimator has no GLS estimate: no shift;
4. except a published **zero**: what matters for it is how large a true count the
   post-processing turns into 0. Its margin is the 90th percentile, over the reruns and the units
   of the level, of the plug-in count of the line wherever a rerun published 0 although the
   plug-in was positive (the counts a zero hides; per line, pooled over the table's lines below
   :data:`MIN_ERRORS` values), and every published zero gets it — rerun-moved or not — unless the
   structural zeros or the declared invariants force that line of that unit to 0
   (:func:`forced_zero_lines`), which gets 0. Where no rerun hid a positive count, step 3's value.
   So a true count of 1–9 published as 0 is inside its interval as often as the simulation says
   such counts are hidden no deeper than the margin; a zero the invariants force keeps 0.

The published ``margins/simulated.parquet`` holds the per (table, level, line, size bin) value;
``dptab verify`` checks every ``moe90`` is that value or 0. The plug-in uses no confidential
data — only the published counts and the declared (public) invariants — so it is post-processing.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

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
#: fewest cells a (line, size bin) group's bias is estimated from (its standard error is then at
#: most a tenth of one cell's GLS standard error); smaller groups use their table's at that level
#: and bin
MIN_BIAS_CELLS = 100


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
    line, size bin) with ``moe90`` (int64, persons or housing units), ``errors`` (how many
    rerun errors it is the quantile of) and ``bias`` (float64, the group's estimated mean error
    of the published counts its errors were shifted to; NaN without one); ``moving``: the cells
    (table, geolevel, unit, line) that some rerun changed — every other cell gets 0
    (``pipeline.release.uncertainty.simulated_moe90``)."""
    from pipeline.job.estimate import LineEstimates
    from pipeline.job.stages import solve_levels

    ts = load_tables(ctx.cfg.tables)
    plug = {kind: {lv: SparseHistogram.from_parquet(ctx.rd.verified(ctx.rd.solved_path(kind, lv)))
                   for lv in ctx.level_names} for kind in ctx.kinds}
    # the unbiased estimates the bias is measured against (the full estimator's, every level)
    gls = ctx.cfg.postprocess.estimator == "full"
    blue = dict(LineEstimates(ctx, ctx.kinds, bottom=True)) if gls else {}
    reruns: dict[tuple[str, str], list[np.ndarray]] = {}
    rerun_blue: dict[tuple[str, str], list[np.ndarray]] = {}
    for k in range(trials):
        rd = _plugin_run(ctx, k, seed)
        solve_levels(rd.root)
        if gls:
            rctx = RunContext.load(rd.root)
            for key, g in LineEstimates(rctx, ctx.kinds, bottom=True).items():
                rerun_blue.setdefault(key, []).append(g)
        for kind in ctx.kinds:
            for lv in ctx.level_names:
                rerun = SparseHistogram.from_parquet(rd.verified(rd.solved_path(kind, lv)))
                for t in ts.of_kind(kind):
                    reruns.setdefault((t.name, lv), []).append(tabulate(rerun, t))
        shutil.rmtree(rd.root)
    rows, moved = [], []
    for kind in ctx.kinds:
        for t in ts.of_kind(kind):
            for lv in ctx.level_names:
                counts = tabulate(plug[kind][lv], t)
                key = (t.name, lv)
                groups, moving = line_margins(counts, np.stack(reruns.pop(key)),
                                              lambda: forced_zero_lines(ctx, kind, lv, t),
                                              blue.get(key), np.stack(rerun_blue.pop(key)) if gls else None)
                u, ln = np.nonzero(moving)
                moved.append(pl.DataFrame({"table": pl.repeat(t.name, u.size, dtype=pl.Utf8, eager=True),
                                           "geolevel": pl.repeat(lv, u.size, dtype=pl.Utf8, eager=True),
                                           "unit": u.astype(np.int64),
                                           "line": np.asarray(t.numbers, np.int32)[ln]}))
                rows += [(t.name, lv, int(t.numbers[j]), SIZE_BIN_LABELS[b], q, n, bias) for j, b, q, n, bias in groups]
    lookup = pl.DataFrame(rows, schema={"table": pl.Utf8, "geolevel": pl.Utf8, "line": pl.Int32,
                                        "size_bin": pl.Utf8, "moe90": pl.Int64, "errors": pl.Int64,
                                        "bias": pl.Float64}, orient="row")
    return lookup, pl.concat(moved)


def line_margins(counts: np.ndarray, reruns: np.ndarray, forced: Callable[[], np.ndarray],
                 blue: np.ndarray | None = None, rerun_blue: np.ndarray | None = None
                 ) -> tuple[list[tuple[int, int, int, int, float]], np.ndarray]:
    """The simulated margins of one table at one level (steps 3–4 of the module doc).

    ``counts``: the plug-in (published) counts, int ``(n_units, n_lines)``; ``reruns``: the
    counts each rerun published, int ``(K, n_units, n_lines)``; ``forced()``: bool ``(n_units,
    n_lines)``, the lines the invariants force to 0 (called only when some rerun hid a positive
    count); ``blue``, ``rerun_blue``: the unbiased (GLS) estimates of the lines from the run's
    measurements, float ``(n_units, n_lines)``, and from each rerun's, ``(K, n_units,
    n_lines)`` — given, the non-zero groups' errors are moved by their bias shift. Returns
    ``[(line index, size bin index, moe90, values it is the quantile of, bias)]`` per (line,
    bin) group with a cell that has a margin (``bias``: the estimated mean error of the group's
    published counts, persons; NaN where not estimated) and that mask, bool ``(n_units, n_lines)``.
    """
    signed = reruns - counts[None]                                 # rerun - plug-in
    errors = np.abs(signed)
    hidden = (reruns == 0) & (counts > 0)[None]                    # plug-in counts a rerun published as 0
    moving = errors.max(axis=0) > 0                                # cells some rerun changed
    if hidden.any():  # every published zero the invariants allow to be positive
        moving |= (counts == 0) & ~forced()
    bins = size_bin(counts)
    plugin = np.broadcast_to(counts, errors.shape)
    if blue is not None:  # the bias terms of every cell (module doc, step 3)
        assert rerun_blue is not None
        gap = counts - blue                                        # published - GLS
        noise = rerun_blue - counts[None]                          # a rerun's GLS - its truth (the plug-in)
        rerun_bins = size_bin(reruns)
    out = []
    for b in range(len(SIZE_BIN_LABELS)):
        # the (line, bin) groups; a group with fewer than MIN_ERRORS values borrows the pooled
        # values of every line in the same bin (an empirical 90% quantile of a handful of values
        # is biased low)
        sel = (bins == b) & moving
        if not sel.any():
            continue
        zeros = b == 0 and hidden.any()
        if zeros:  # published zeros: the counts a zero hides
            pooled = np.sort(plugin[hidden])
            per_line = [np.sort(plugin[:, :, j][hidden[:, :, j]]) for j in range(counts.shape[1])]
        shift = None
        if b > 0 and blue is not None:
            shift = _BiasShift(gap, noise, (rerun_bins == b) & moving[None], sel)
        for j in range(counts.shape[1]):
            if not sel[:, j].any():
                continue
            if zeros:
                vals = per_line[j] if per_line[j].size >= MIN_ERRORS else pooled
                bias = float("nan")
            else:
                own = sel[:, j].sum() * reruns.shape[0] >= MIN_ERRORS
                group = signed[:, sel[:, j], j] if own else signed[:, sel]
                bias = float("nan") if shift is None else shift.bias(j)
                # the errors moved by the whole persons nearest to (bias - their own mean)
                move = 0 if shift is None else int(np.rint(bias - group.mean()))
                vals = np.sort(np.abs(group.ravel() + move))
            q = vals[int(np.ceil(QUANTILE * vals.size)) - 1]  # inverted CDF: exact, integer
            out.append((j, b, int(q), int(vals.size), bias))
    return out, moving


class _BiasShift:
    """The bias estimate of one size bin's groups (module doc, step 3): per line from its own
    cells when it has :data:`MIN_BIAS_CELLS` of them, else from the cells of every line in the bin.

    ``gap``: float ``(n_units, n_lines)``, published − GLS estimate; ``noise``: float ``(K,
    n_units, n_lines)``, each rerun's GLS estimate − the plug-in; ``in_bin``: bool ``(K, n_units,
    n_lines)``, the rerun counts in this bin (of cells with a margin); ``sel``: bool ``(n_units,
    n_lines)``, the bin's published cells with a margin."""

    def __init__(self, gap: np.ndarray, noise: np.ndarray, in_bin: np.ndarray, sel: np.ndarray) -> None:
        self.gap, self.noise, self.rerun_sel, self.sel = gap, noise, in_bin, sel
        self.pooled = self._bias(gap[sel], noise[in_bin])

    @staticmethod
    def _bias(gap: np.ndarray, noise: np.ndarray) -> float:
        # E[published - truth | bin] = E[published - g | bin] + E[g - truth | bin]; the second
        # term (the GLS noise the bin selects) from the reruns, whose truth is known
        return float(gap.mean() + (noise.mean() if noise.size else 0.0))

    def bias(self, j: int) -> float:
        cells = self.sel[:, j]
        if cells.sum() < MIN_BIAS_CELLS:
            return self.pooled
        return self._bias(self.gap[cells, j], self.noise[:, :, j][self.rerun_sel[:, :, j]])


def forced_zero_lines(ctx: RunContext, kind: str, level: str, table: Any) -> np.ndarray:
    """Which lines of ``table`` the spec and the declared invariants force to 0 in each unit of
    ``level``: bool ``(n_units, n_lines)``. A line is forced where every cell it sums is a
    structural zero, where the unit's exact total (an invariant) is 0, or where every cell it sums
    has a group-quarters/household answer the invariants rule out in that unit (no facility of the
    type, no housing unit; ``pipeline.job.shard`` gives the engine the same constraints)."""
    from pipeline.job.shard import _child_constraints

    spec = ctx.spec(kind)
    n_units = int(ctx.geography.level(level).n_units)
    live = ~spec.structural_zero_mask
    cells_of = [np.intersect1d(table.matrix[j].indices, np.flatnonzero(live)) for j in range(table.n_lines)]
    forced = np.zeros((n_units, table.n_lines), bool)
    forced[:, [j for j, c in enumerate(cells_of) if c.size == 0]] = True
    cons = _child_constraints(ctx, kind, level, 0, n_units)
    if cons["totals"] is not None:
        forced |= (np.asarray(cons["totals"]) == 0)[:, None]
    zero = cons["zero_answers"]
    if zero is not None:
        bound = spec.query(spec.role("bound")).matrix().tocsc()
        answer_of_cell = np.asarray(bound.argmax(axis=0)).ravel()  # each cell is in one answer
        for j, c in enumerate(cells_of):
            if c.size:
                forced[:, j] |= np.asarray(zero)[:, np.unique(answer_of_cell[c])].all(axis=1)
    return forced


def margins_seed(run_seed: int | None) -> int:
    """The seed of the reruns' noise (62 bits): derived from the run's seed when the run is
    seeded (a seeded test or experiment then reproduces its release exactly), else drawn from
    the operating system's secure source. Either way it is recorded in the run state (and the
    ``margins`` stage's record); the reruns' noise is post-processing of the published counts, so this seed does
    not bear on privacy."""
    if run_seed is None:
        return secrets.randbits(62)
    digest = hashlib.sha256(f"dptab-margins:{int(run_seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


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
        seed = margins_seed(ctx.cfg.privacy.seed if ctx.cfg.privacy.randomness == "seeded" else None)
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
