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
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline import __version__
from pipeline.files import write_parquet_atomic
from pipeline.inputs.histograms import build_person_histograms, build_unit_counts
from pipeline.inputs.invariants import declared, units_truth, write_invariants
from pipeline.inputs.validation import validate_inputs
from pipeline.job.context import RunContext, configured_strategies, total_rho
from pipeline.job.executor import close_executor, executor_for
from pipeline.job.plan import plan, shard_bounds
from pipeline.job.progress import StageProgress
from pipeline.job.rundir import RunDir, new_run_id
from pipeline.model.config import ConfigError, RunConfig, load_config
from pipeline.model.geography import Geography, load_geolevels
from pipeline.model.spec import load_spec
from pipeline.model.strategy import Strategy
from pipeline.privacy import randomness
from pipeline.privacy.ledger import Ledger
from pipeline.release.writer import ReleaseExistsError

# --------------------------------------------------------------------------------------
# prepare


def prepare(config_path: str | Path | None, resume_dir: str | Path | None = None) -> Path:
    """Create (or reopen, on resume) the run directory; refuse overspending before reading data.

    The ledger check happens here, before any confidential file is opened, and reserves the
    run's ρ for the dataset; a release id that already exists is refused.
    """
    if resume_dir is not None:
        return RunDir.open(Path(resume_dir)).root
    if config_path is None:
        raise ValueError("prepare needs a config path or a run directory to resume")
    cfg = load_config(config_path)
    release_id = cfg.release_id or new_run_id(cfg.dataset_id)
    if (cfg.output.releases_dir / release_id).exists():
        raise ReleaseExistsError(f"release {release_id!r} already exists in {cfg.output.releases_dir}; "
                                 "releases are never overwritten")
    strategies = configured_strategies(cfg)
    _check_strategies_fit(cfg, strategies)
    rho = total_rho(strategies)
    Ledger(cfg.privacy.ledger).check_and_reserve(
        cfg.dataset_id, release_id, rho, Fraction(cfg.privacy.lifetime_rho)
    )
    stale = cfg.output.runs_dir / release_id
    if stale.is_dir() and not RunDir(stale).state_path.exists():
        # a previous attempt died inside prepare, before its state existed: no data was read
        # and no noise drawn there yet, so the half-made directory is safe to start over
        shutil.rmtree(stale)
    rd = RunDir.create(cfg.output.runs_dir, release_id, {
        "release_id": release_id,
        "dataset_id": cfg.dataset_id,
        "config_hash": cfg.config_hash(),
        "software_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rho": str(rho),
        "randomness": cfg.privacy.randomness,
        "seed": cfg.privacy.seed,
    })
    _write_resolved_config(cfg, rd.config_path)
    if cfg.privacy.randomness == "keyed":
        randomness.create_key(rd.key_path)
    return rd.root


def _check_strategies_fit(cfg: RunConfig, strategies: dict[str, Strategy]) -> None:
    """Refuse (before any budget is reserved) strategies that do not fit the run: a persons
    strategy for another spec, or levels the run's geography does not have."""
    levels = [lv.name for lv in load_geolevels(cfg.geography.levels)]
    for kind, s in strategies.items():
        want_spec = cfg.spec if kind == "persons" else "units"
        if load_spec(s.spec).name != load_spec(want_spec).name:
            raise ConfigError(f"{cfg.source_path}: the {kind} strategy {s.name!r} is for spec {s.spec!r}, "
                              f"but the run's {kind} spec is {want_spec!r}")
        missing = [lv for lv in s.level_names if lv not in levels]
        if missing:
            raise ConfigError(f"{cfg.source_path}: the {kind} strategy {s.name!r} measures levels {missing} "
                              f"that the geography {cfg.geography.levels!r} does not have ({', '.join(levels)})")


def _write_resolved_config(cfg: RunConfig, path: Path) -> None:
    data = cfg.model_dump(mode="json", exclude={"source_path"})
    data["release_id"] = path.parent.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------------------
# inputs -> histograms and invariants


def stage_inputs(run_dir: str | Path) -> dict[str, Any]:
    """Validate the inputs; write the geography, the true histograms of every level
    (confidential) and the declared public invariants (``invariants/<level>.parquet``)."""
    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("inputs"):
        return ctx.rd.done_info("inputs") or {}
    t0 = time.perf_counter()
    inputs = validate_inputs(ctx.cfg.inputs.persons, ctx.cfg.inputs.units, ctx.persons_spec)
    # The geography comes from the units file (public: every block with a housing unit or a
    # facility); validation guarantees every person's block is in it.
    blocks = inputs.units.select("geoid").unique().sort("geoid").collect()
    write_parquet_atomic(blocks, ctx.rd.geography_path)
    geo = Geography.from_block_geoids(blocks["geoid"].to_numpy(), load_geolevels(ctx.cfg.geography.levels))
    person_hists = build_person_histograms(inputs.persons, geo, ctx.persons_spec)
    unit_counts = build_unit_counts(inputs.units, geo)
    for lv in geo.levels:
        person_hists[lv.name].to_parquet(ctx.rd.truth_path("persons", lv.name))
        units_truth(unit_counts[lv.name]).to_parquet(ctx.rd.truth_path("units", lv.name))
        write_invariants(declared(lv.name, person_hists[lv.name], unit_counts[lv.name], ctx.cfg.invariants),
                         ctx.rd.invariants_path(lv.name), int(lv.n_units))
    info = {"levels": {lv.name: int(lv.n_units) for lv in geo.levels},
            "seconds": round(time.perf_counter() - t0, 3)}
    ctx.rd.mark_done("inputs", info)
    return info


# --------------------------------------------------------------------------------------
# one shard, one level


def _shard_stage(kind: str, level: str, shard: int) -> str:
    return f"shard:{kind}:{level}:{shard:05d}"


def stage_shard(run_dir: str | Path, kind: str, level: str, shard: int) -> dict[str, Any]:
    """Measure (write-once) and post-process one shard of parents; checkpoint its output."""
    from pipeline.job.shard import solve_shard

    ctx = RunContext.load(run_dir)
    stage = _shard_stage(kind, level, shard)
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    info = solve_shard(ctx, kind, level, shard, shard_bounds(ctx, level), executor_for(ctx.cfg.execution.workers))
    ctx.rd.mark_done(stage, info)
    return info


def stage_finish_level(run_dir: str | Path, kind: str, level: str) -> dict[str, Any]:
    """Merge a level's shards into ``solved/<kind>_<level>.parquet`` and check parent sums."""
    from pipeline.job.shard import merge_level

    ctx = RunContext.load(run_dir)
    stage = f"level:{kind}:{level}"
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    n = len(shard_bounds(ctx, level)) - 1
    infos = [ctx.rd.done_info(_shard_stage(kind, level, s)) or {} for s in range(n)]
    summary = merge_level(ctx, kind, level, infos)
    ctx.rd.mark_done(stage, summary)
    return summary


def solve_levels(run_dir: str | Path,
                 each_level: Callable[[str, Any, Callable[[int], dict[str, Any]]], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Every step of :func:`plan` in this process: shards, then finish the level; returns the
    level summaries. ``each_level(label, shards, run_shard)`` may drive a level's shards (e.g.
    with progress bars); by default they run in order."""
    ctx = RunContext.load(run_dir)
    summaries = []
    for step in plan(ctx):
        def run_shard(s: int, k: str = step.kind, lv: str = step.level) -> dict[str, Any]:
            return stage_shard(run_dir, k, lv, s)
        if each_level is None:
            for s in step.shards:
                run_shard(s)
        else:
            each_level(f"{step.kind} {step.level}", list(step.shards), run_shard)
        summaries.append(stage_finish_level(run_dir, step.kind, step.level))
    return summaries


# --------------------------------------------------------------------------------------
# publish


def stage_publish(run_dir: str | Path) -> dict[str, Any]:
    """Tables, microdata and the release folder; then the ledger records the spend."""
    from pipeline.job.publish import adopt_existing_release, publish_release

    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("publish"):
        return ctx.rd.done_info("publish") or {}
    # a run killed after the release was renamed into place but before this stage was
    # recorded: the folder is ours if its manifest names this run and it verifies
    t0 = time.perf_counter()
    info = adopt_existing_release(ctx) or publish_release(ctx)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    Ledger(ctx.cfg.privacy.ledger).commit(ctx.cfg.dataset_id, str(ctx.state["release_id"]))
    ctx.rd.mark_done("publish", info)
    return info


# --------------------------------------------------------------------------------------
# the whole job without Prefect


def run(config_path: str | Path | None = None, resume_dir: str | Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a whole release job in this process; returns the publish manifest."""
    t0 = time.perf_counter()
    run_dir = prepare(config_path, resume_dir=resume_dir)
    try:
        with StageProgress(enabled=progress) as prog:
            prog.step("validate + histograms", lambda: stage_inputs(run_dir))
            diagnostics = solve_levels(run_dir, prog.shards)
            published = dict(prog.step("publish", lambda: stage_publish(run_dir)))
    finally:
        close_executor()
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
