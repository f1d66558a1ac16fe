"""The whole job as resumable stages: ``dptab run CONFIG`` and the Prefect flow call these.

Order (ARCHITECTURE §1): prepare (ledger check before any data is read, run directory) →
inputs (validate, histograms per level, public invariants) → for each step of
:func:`pipeline.job.plan.plan` (run kind × level), per shard: measure (write-once) →
post-process → checkpoint → finish level (merge shards, check parent sums) → publish (tables,
microdata, release) → ledger commit.

Every stage takes the run directory and returns a small JSON-able manifest; state lives in
files under the run directory, recorded in ``state.json`` only once written, so a stage
that is re-entered (resume, retry) does nothing or redoes only the unfinished shard. Noise
is keyed by (release key, run kind, level, shard) and measurement files are write-once, so a
re-entered shard re-reads its measurements instead of drawing new ones.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from pipeline.files import private_files, write_parquet_atomic
from pipeline.inputs.histograms import build_person_histograms, build_unit_counts
from pipeline.inputs.invariants import declared, units_truth, write_invariants
from pipeline.inputs.lookup import read_lookup
from pipeline.inputs.problems import InputValidationError, Problem
from pipeline.inputs.readers import input_fingerprint, read_block_list, read_persons, read_units
from pipeline.inputs.validation import validate_inputs
from pipeline.job.context import RunContext
from pipeline.job.executor import ClusterTasks, DaskExecutor, Executor, close_executor, cluster_threads, executor_for
from pipeline.job.plan import plan, shard_areas, shard_bounds
from pipeline.job.prepare import check_rho, prepare
from pipeline.job.progress import StageProgress
from pipeline.job.rundir import RunDir
from pipeline.model.config import RunConfig
from pipeline.model.geography import Geography
from pipeline.privacy.ledger import Ledger, LedgerError
from pipeline.runtime import return_free_memory

# --------------------------------------------------------------------------------------
# inputs -> histograms and invariants


def stage_inputs(run_dir: str | Path) -> dict[str, Any]:
    """Build the geography, the true histograms of every level (confidential) and the declared
    public invariants (``invariants/<level>.parquet``) from the validated inputs."""
    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("inputs"):
        return ctx.rd.done_info("inputs") or {}
    t0 = time.perf_counter()
    cfg = ctx.cfg
    validated = ctx.state.get("validated_inputs") or {}
    if (validated.get("persons") == input_fingerprint(cfg.inputs.persons)
            and validated.get("units") == input_fingerprint(cfg.inputs.units)):
        # the files prepare validated, unchanged: read them without checking every row again
        persons, units = read_persons(cfg.inputs.persons, ctx.contract), read_units(cfg.inputs.units, ctx.contract)
    else:
        try:
            lookup = (read_lookup(cfg.geography.lookup, [lv.name for lv in cfg.geography.geolevels()])
                      if cfg.geography.lookup is not None else None)
            inputs = validate_inputs(cfg.inputs.persons, cfg.inputs.units, ctx.persons_spec, lookup=lookup)
        except InputValidationError as exc:
            # the files changed after the run validated them and reserved its budget
            raise InputValidationError(exc.problems + [Problem(
                str(ctx.rd.root), "", "inputs_changed_after_reservation", 1,
                "the inputs changed after this run validated them and reserved its budget: restore them and "
                f"resume, or give the budget back with `dptab ledger fail {ctx.rd.root}`")]) from None
        persons, units = inputs.persons, inputs.units
    with private_files():
        # The geography comes from the units file (public: every block with a housing unit or
        # a facility); validation guarantees every person's block is in it.
        table, geo = input_geography(cfg, units)
        write_parquet_atomic(table, ctx.rd.geography_path)
        person_hists = build_person_histograms(persons, geo, ctx.persons_spec)
        unit_counts = build_unit_counts(units, geo)
        written = [ctx.rd.geography_path]
        for lv in geo.levels:
            person_hists[lv.name].to_parquet(ctx.rd.truth_path("persons", lv.name))
            units_truth(unit_counts[lv.name]).to_parquet(ctx.rd.truth_path("units", lv.name))
            top = (lv is geo.levels[0]) if geo.is_lookup else None  # a lookup's declared total: its top level
            write_invariants(declared(lv.name, person_hists[lv.name], unit_counts[lv.name], cfg.invariants, top),
                             ctx.rd.invariants_path(lv.name), int(lv.n_units))
            written += [ctx.rd.truth_path("persons", lv.name), ctx.rd.truth_path("units", lv.name),
                        ctx.rd.invariants_path(lv.name)]
    info = {"levels": {lv.name: int(lv.n_units) for lv in geo.levels},
            "seconds": round(time.perf_counter() - t0, 3)}
    ctx.rd.mark_done("inputs", info, files=written)
    return info


def input_geography(cfg: RunConfig, units: pl.LazyFrame) -> tuple[pl.DataFrame, Geography]:
    """The run's geography and the table it is stored as (``geography.parquet``): the public
    lookup when the config names one (every unit at every level, with records or not), else the
    public block list, else every block of the units file (public: every block with a housing
    unit or a facility; validation guarantees every person's block is in it)."""
    levels = cfg.geography.geolevels()
    if cfg.geography.lookup is not None:
        table = read_lookup(cfg.geography.lookup, [lv.name for lv in levels])
        return table, Geography.from_lookup(table, levels)
    if cfg.geography.blocks is not None:
        blocks = read_block_list(cfg.geography.blocks, units, levels[-1].digits)
    else:
        blocks = units.select("geoid").unique().sort("geoid").collect()
    return blocks, Geography.from_block_geoids(blocks["geoid"].to_numpy(), levels)


# --------------------------------------------------------------------------------------
# one shard, one level


def _shard_stage(kind: str, level: str, shard: int, action: str = "solve") -> str:
    prefix = "shard" if action == "solve" else action
    return f"{prefix}:{kind}:{level}:{shard:05d}"


def stage_shard(run_dir: str | Path, kind: str, level: str, shard: int, action: str = "solve") -> dict[str, Any]:
    """One shard of one step of :func:`plan`: ``solve`` measures (write-once) and post-processes
    a shard of parents and checkpoints its output; ``measure`` only draws its measurements (the
    full estimator); ``estimate`` fits the full estimator over every level of ``kind``."""
    from pipeline.job.shard import measure_only, solve_shard

    ctx = RunContext.load(run_dir)
    stage = f"estimate:{kind}" if action == "estimate" else _shard_stage(kind, level, shard, action)
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    with private_files():
        if action == "estimate":
            from pipeline.job.estimate import estimate_kind

            info, files = estimate_kind(ctx, kind, executor_for(ctx.cfg.execution.workers))
        elif action == "measure":
            info = measure_only(ctx, kind, level, shard, shard_bounds(ctx, level))
            files = [ctx.rd.measurement_path(kind, level, shard)]
        elif action == "solve":
            bounds = shard_bounds(ctx, level)
            threads = cluster_threads()
            executor: ClusterTasks | Executor
            if not threads:
                executor = executor_for(ctx.cfg.execution.workers)
            elif len(bounds) - 1 < threads:  # a level of fewer shards than threads: spread its parents
                executor = ClusterTasks(threads)
            else:
                # the cluster's threads are the run's cores and the other shards keep them busy. A
                # pool here (a worker without a nanny is not daemonic) gave each of 2 one-thread
                # workers `workers` solver processes of its own: four solvers on two cores (10 M
                # persons: block level 37 s against 32 s locally, 4.7 GB peak against 2.6)
                executor = executor_for(1)
            info = solve_shard(ctx, kind, level, shard, bounds, executor)
            files = [ctx.rd.measurement_path(kind, level, shard), ctx.rd.solved_shard_path(kind, level, shard)]
        else:
            raise ValueError(f"unknown step action {action!r}")
    ctx.rd.mark_done(stage, info, files=files)
    return info


def stage_finish_level(run_dir: str | Path, kind: str, level: str, action: str = "solve") -> dict[str, Any]:
    """Finish a step: for ``solve``, merge a level's shards into ``solved/<kind>_<level>.parquet``
    and check parent sums; the other steps have nothing to merge (returns their summary)."""
    from pipeline.job.shard import merge_level

    ctx = RunContext.load(run_dir)
    if action == "estimate":
        return {"kind": kind, "level": "*", "action": action, **(ctx.rd.done_info(f"estimate:{kind}") or {})}
    n = len(shard_bounds(ctx, level)) - 1
    if action == "measure":
        infos = [ctx.rd.done_info(_shard_stage(kind, level, s, action)) or {} for s in range(n)]
        return {"kind": kind, "level": level, "action": action, "shards": n,
                "measured_rows": sum(i.get("measured_rows", 0) for i in infos),
                "seconds": round(sum(i.get("seconds", 0.0) for i in infos), 3)}
    stage = f"level:{kind}:{level}"
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    infos = [ctx.rd.done_info(_shard_stage(kind, level, s)) or {} for s in range(n)]
    with private_files():
        summary = merge_level(ctx, kind, level, infos)
    ctx.rd.mark_done(stage, summary, files=[ctx.rd.solved_path(kind, level)])
    return summary


def _stage_shard_item(item: tuple[str, str, str, int, str]) -> dict[str, Any]:
    """One shard as a cluster task: ``(run_dir, kind, level, shard, action)``."""
    return stage_shard(*item)


def step_label(step: Any) -> str:
    """How progress output names a step: ``persons county`` (solve), ``persons county (measure)``."""
    if step.action == "estimate":
        return f"{step.kind} full estimator"
    return f"{step.kind} {step.level}" + ("" if step.action == "solve" else f" ({step.action})")


class _ShardWindow:
    """The shards of one step run on threads of this process, up to ``size`` at a time, started
    in shard order; :meth:`result` returns shard ``s``'s summary (asked for in shard order).

    Why: a shard hands its parents to the worker pool and waits for all of them, so with one
    shard at a time a worker idles whenever the shard's last parent is large — a national tract
    level has counties of ~2,500 tracts, each one problem solved on one core for minutes, and
    every shard also drew its measurements while the pool waited. With the next shards already
    started, their draws and parents keep the workers busy meanwhile. Each shard is independent
    (its own noise source and files) and deterministic, so the order they finish in changes
    nothing; memory grows by the ``size`` shards in flight (each ~``shard_target_cells``)."""

    def __init__(self, shards: Sequence[int], run_shard: Callable[[int], dict[str, Any]], size: int) -> None:
        self.pool = ThreadPoolExecutor(max(1, size), thread_name_prefix="dptab-shard")
        # all submitted now; the executor starts them in this order as threads free up
        self.futures = {s: self.pool.submit(run_shard, s) for s in shards}

    def result(self, s: int) -> dict[str, Any]:
        return self.futures.pop(s).result()

    def close(self) -> None:
        """Wait for the shards running (their files stay whole) and drop the others."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class _PooledShards:
    """The shards of every ``measure`` step of one run kind (the full estimator's draws: no
    solve, so nothing to spread over the pool from a thread) as work items of the run's worker
    pool, all submitted when the first of those steps starts, the bottom level's first (the
    largest shards first, so the small ones fill the end). The levels' draws are independent of
    each other, so no level waits for the one above to finish. A shard's noise is keyed by (run
    kind, level, shard) and its stage is recorded under the run directory's lock, so where and
    when it runs changes nothing (as on a Dask cluster)."""

    def __init__(self, executor: Any, run_dir: str | Path, steps: Sequence[Any]) -> None:
        self.kind = steps[0].kind
        self.futures = {(st.level, s): executor.submit(_stage_shard_item, (str(run_dir), st.kind, st.level, s, st.action))
                        for st in reversed(steps) for s in st.shards}

    def window(self, level: str) -> "_PooledLevel":
        """The shards of one level, with :class:`_ShardWindow`'s interface."""
        return _PooledLevel(self, level)

    def close(self) -> None:
        """Drop the shards not started; those running finish (their files stay whole)."""
        for f in self.futures.values():
            f.cancel()
        for f in self.futures.values():
            if not f.cancelled():
                f.exception()  # waits; a failure was already raised by result() if it mattered
        self.futures.clear()


class _PooledLevel:
    def __init__(self, pooled: _PooledShards, level: str) -> None:
        self.pooled, self.level = pooled, level

    def result(self, s: int) -> dict[str, Any]:
        return self.pooled.futures.pop((self.level, s)).result()  # type: ignore[no-any-return]

    def close(self) -> None:
        """After every shard of the level was taken, nothing; otherwise (a shard failed or the
        run was interrupted) drop every shard of the kind not yet started."""
        if any(level == self.level for level, _ in self.pooled.futures):
            self.pooled.close()


def solve_levels(run_dir: str | Path,
                 each_level: Callable[[str, Any, Callable[[int], dict[str, Any]], list[str]], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Every step of :func:`plan`: its shards, then finish the step; returns the step
    summaries. Locally the shards run in this process, ``workers + 1`` at a time with a worker
    pool (each spreading its parents over it; :class:`_ShardWindow`), and
    ``each_level(label, shards, shard_result, areas)`` may follow them in shard order (progress
    bars; ``areas``: where each shard lies, :func:`shard_areas`); with ``execution.executor:
    dask`` each shard is a task on the cluster."""
    ctx = RunContext.load(run_dir)
    dask = DaskExecutor(ctx.cfg.execution.dask_address) if ctx.cfg.execution.executor == "dask" else None
    # with a worker pool, one shard more than workers; without one (workers: 1) shards would only
    # take turns on this process's one core, each holding its data: one at a time
    pool = executor_for(ctx.cfg.execution.workers)
    in_flight = ctx.cfg.execution.workers + 1 if pool.parallel else 1
    summaries = []
    steps = plan(ctx)
    pooled: _PooledShards | None = None
    try:
        for step in steps:
            def run_shard(s: int, k: str = step.kind, lv: str = step.level, a: str = step.action) -> dict[str, Any]:
                return stage_shard(run_dir, k, lv, s, a)
            if dask is not None:
                dask.map(_stage_shard_item, [(str(run_dir), step.kind, step.level, s, step.action)
                                             for s in step.shards])
            else:
                window: _ShardWindow | _PooledLevel
                if step.action == "measure" and pool.parallel:
                    if pooled is None or pooled.kind != step.kind:
                        pooled = _PooledShards(pool, run_dir, [st for st in steps
                                                               if st.kind == step.kind and st.action == "measure"])
                    window = pooled.window(step.level)
                else:
                    window = _ShardWindow(step.shards, run_shard, in_flight if len(step.shards) > 1 else 1)
                try:
                    if each_level is None:
                        for s in step.shards:
                            window.result(s)
                    else:
                        each_level(step_label(step), list(step.shards), window.result,
                                   shard_areas(ctx.geography, step.level, shard_bounds(ctx, step.level))
                                   if step.level in ctx.level_names else [""])
                finally:
                    window.close()
            summaries.append(stage_finish_level(run_dir, step.kind, step.level, step.action))
            return_free_memory()  # the step's shards are gone; their freed pages go back
            pool.next_step()  # (and the workers' when the next step's items come)
    finally:
        if pooled is not None:
            pooled.close()
        if dask is not None:
            dask.close()
    return summaries


# --------------------------------------------------------------------------------------
# publish


def stage_publish(run_dir: str | Path) -> dict[str, Any]:
    """Tables, microdata and the release folder. The ledger records the spend as committed
    right before the finished folder is renamed into place, so nothing becomes public that the
    ledger does not count; a ledger that is gone or was replaced stops the run."""
    from pipeline.job.publish import adopt_existing_release, publish_release, remove_partial_releases

    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("publish"):
        return ctx.rd.done_info("publish") or {}
    st = ctx.state
    if st.get("ledger_failed"):
        raise LedgerError(f"run {ctx.rd.root} was marked failed in the ledger; its noise may never be published")
    check_rho(ctx)
    if ctx.cfg.output.margins == "simulated":  # idempotent: done once, before anything is published
        from pipeline.job.margins import stage_margins

        stage_margins(run_dir)
    ledger = Ledger.open_existing(ctx.cfg.privacy.ledger, st.get("ledger_id"))  # type: ignore[arg-type]
    release_id = str(st["release_id"])
    status = ledger.status(ctx.cfg.dataset_id, release_id)
    if status not in ("reserved", "committed") or ledger.holder(ctx.cfg.dataset_id, release_id) != st.get("run_token"):
        raise LedgerError(f"release {release_id!r} of dataset {ctx.cfg.dataset_id!r} is "
                          f"{status or 'not in the ledger'} for this run; its noise may not be published")
    # from here on data derived from the noise may leave the run directory (the hidden release
    # folder): `dptab ledger fail` refuses such a run even if that folder is later removed
    ctx.rd.update(publish_started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    # a run killed after the release was renamed into place but before this stage was
    # recorded: the folder is ours if its manifest names this run and it verifies
    info = adopt_existing_release(ctx)
    if info is None:
        remove_partial_releases(ctx)  # folders of an attempt killed while writing
        info = publish_release(ctx, before_publish=lambda: ledger.commit(ctx.cfg.dataset_id, release_id))
    ledger.commit(ctx.cfg.dataset_id, release_id)  # idempotent (adopted releases, old runs)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.rd.mark_done("publish", info)
    return info


# --------------------------------------------------------------------------------------
# the whole job without Prefect


def run(config_path: str | Path | None = None, resume_dir: str | Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a whole release job in this process; returns the publish manifest."""
    t0 = time.perf_counter()
    run_dir = prepare(config_path, resume_dir=resume_dir)
    rd = RunDir(Path(run_dir))
    rd.drive()
    try:
        with StageProgress(enabled=progress) as prog:
            prog.step("validate + histograms", lambda: stage_inputs(run_dir))
            diagnostics = solve_levels(run_dir, prog.shards)
            if RunContext.load(run_dir).cfg.output.margins == "simulated":
                from pipeline.job.margins import stage_margins

                prog.step("margins of error (simulated)", lambda: stage_margins(run_dir))
            # publishing runs in this process: the worker pool's memory goes back before it
            close_executor()
            published = dict(prog.step("publish", lambda: stage_publish(run_dir)))
    finally:
        close_executor()
        rd.release()
    published["run_dir"] = str(run_dir)
    published["levels"] = diagnostics
    published["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return published


def closing_summary(out: dict[str, Any], started: float) -> dict[str, Any]:
    """The lines ``dptab run`` prints after a run: levels, units, ρ and ε, wall time, peak
    memory of this process (MB), release path. ``out`` is :func:`run`'s (or the flow's) result."""
    ctx = RunContext.load(out["run_dir"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    units = ctx.rd.done_info("inputs") or {}
    return {
        "release": out.get("release_path") or out.get("release"),
        "run directory": out["run_dir"],
        "levels": ", ".join(f"{lv} {units.get('levels', {}).get(lv)}" for lv in ctx.level_names),
        "rho": f"{float(Fraction(out['rho'])):.4f} (exact {out['rho']})",
        "epsilon": f"{float(Fraction(out['epsilon'])):.2f} at delta {ctx.cfg.privacy.delta:g} "
                   f"(exact upper bound {out['epsilon']})",
        "wall time (s)": round(time.perf_counter() - started, 1),
        "peak memory (MB)": round(peak_mb),
    }
