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

import json
import os
import resource
import secrets
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline import __version__
from pipeline.errors import RefusedError
from pipeline.files import crash_point, private_files, write_parquet_atomic, write_text_atomic
from pipeline.inputs.histograms import build_person_histograms, build_unit_counts
from pipeline.inputs.invariants import declared, units_truth, write_invariants
from pipeline.inputs.problems import InputValidationError, Problem
from pipeline.inputs.readers import input_fingerprint, read_block_list, read_persons, read_units
from pipeline.inputs.validation import validate_inputs
from pipeline.job.context import RunContext, configured_strategies, definition_fingerprints, total_rho
from pipeline.job.executor import DaskExecutor, close_executor, executor_for
from pipeline.job.plan import plan, shard_bounds
from pipeline.job.progress import StageProgress
from pipeline.job.rundir import RunDir, RunDirError, new_run_id
from pipeline.model.config import ConfigError, RunConfig, load_config
from pipeline.model.geography import Geography, load_geolevels
from pipeline.model.spec import load_spec
from pipeline.model.strategy import Strategy
from pipeline.privacy import randomness
from pipeline.privacy.ledger import Ledger, LedgerError, LedgerMissingError
from pipeline.release.manifest import ReleaseExistsError

# --------------------------------------------------------------------------------------
# prepare

#: the largest lifetime ρ a config may declare (ε in the thousands; beyond is a typo)
MAX_LIFETIME_RHO = Fraction(10**6)


def prepare(config_path: str | Path | None, resume_dir: str | Path | None = None) -> Path:
    """Create (or reopen, on resume) the run directory and reserve the run's ρ in the ledger.

    In this order, so that bad input never holds budget and no noise is drawn uncounted:
    config, strategies and output paths are checked; the ledger refuses an overspend before
    any data is read; the inputs are validated completely; the run directory is made (mode
    0700, with the run's ledger token); the ρ is reserved atomically. Any failure before the
    reservation leaves no reservation and no run directory. A release id that already exists
    (as a release, a run directory or a ledger row of another run) is refused.
    """
    if resume_dir is not None:
        ctx = RunContext.load(resume_dir)  # refuses an edited config.yaml
        ctx.rd.drive()  # one driver: nobody else is writing when the temp files are removed
        _reserve(ctx)
        _remove_stale_temp_files(ctx.rd)
        return ctx.rd.root
    if config_path is None:
        raise ConfigError("give a run config, or a run directory to resume")
    cfg = check_config(config_path)
    release_id = cfg.release_id or new_run_id(cfg.dataset_id)
    _check_release_id(cfg, release_id)
    rho = total_rho(configured_strategies(cfg))
    lifetime = Fraction(cfg.privacy.lifetime_rho)
    ledger = _ledger_for_new_run(cfg)
    ledger.check_budget(cfg.dataset_id, rho, lifetime)  # before any data is read
    valid = validate_inputs(cfg.inputs.persons, cfg.inputs.units, load_spec(cfg.spec))
    if cfg.geography.blocks is not None:
        read_block_list(cfg.geography.blocks, valid.units, load_geolevels(cfg.geography.levels)[-1].digits)
    fingerprint = {"persons": input_fingerprint(cfg.inputs.persons), "units": input_fingerprint(cfg.inputs.units)}
    stale = cfg.output.runs_dir / release_id
    if stale.is_dir() and not RunDir(stale).state_path.exists():
        # a previous attempt died inside prepare, before its state existed: no data was read
        # into it and no noise drawn there, so the half-made directory is safe to start over
        shutil.rmtree(stale)
    token = secrets.token_hex(16)
    config_text = _resolved_config_text(cfg, release_id)
    with private_files():
        # config.yaml is written (atomically) before state.json, and state.json is born with
        # every fingerprint the resume checks: no kill can leave a state without them
        rd = RunDir.create(cfg.output.runs_dir, release_id, {
            "release_id": release_id,
            "dataset_id": cfg.dataset_id,
            "config_hash": cfg.config_hash(),
            # of the config as written (with its release id), which is what a resume loads
            "config_fingerprint": cfg.model_copy(update={"release_id": release_id}).run_fingerprint(),
            "definitions": definition_fingerprints(cfg),
            "software_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rho": str(rho),
            "randomness": cfg.privacy.randomness,
            "seed": cfg.privacy.seed,
            "run_token": token,
            "ledger": str(cfg.privacy.ledger),
            "ledger_id": ledger.ledger_id,
            "validated_inputs": fingerprint,
        }, before_state=lambda root: write_text_atomic(root / "config.yaml", config_text))
        reserved = False
        try:
            if cfg.privacy.randomness == "keyed":
                randomness.create_key(rd.key_path)  # before the reservation: a resume finds it
            ledger.check_and_reserve(cfg.dataset_id, release_id, rho, lifetime, run=token)
            reserved = True
        except BaseException:
            # nothing was read into the run directory and no noise drawn: it goes, unless the
            # reservation got committed after all (an interrupt inside the ledger call): then
            # the directory stays, so the run can resume or be given back with `dptab ledger fail`
            if not reserved and ledger.holder(cfg.dataset_id, release_id) != token:
                shutil.rmtree(rd.root, ignore_errors=True)
            raise
        crash_point("prepare:reserved")
    return rd.root


def _remove_stale_temp_files(rd: RunDir) -> list[Path]:
    """Temp files of writes killed before their rename (``.<name>.tmp-*``, ``.state.json.*``).
    Called when a run resumes, when no other process works in its run directory; a finished
    file is only ever made by the rename, so these hold nothing that is used."""
    stale = [p for p in rd.root.rglob(".*") if p.is_file()
             and (".tmp" in p.name or p.name.startswith(f".{rd.state_path.name}."))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _reserve(ctx: RunContext) -> None:
    """Resume: the run's reservation must still be in the same ledger (reserved or committed);
    a run made before it was reserved (killed in between) reserves now, with the same checks."""
    st = ctx.state
    if st.get("ledger_failed"):
        raise LedgerError(f"run {ctx.rd.root} was marked failed in the ledger (`dptab ledger fail`); its noise "
                          "may never be published — start a new run with a new release id")
    _check_rho(ctx)
    ledger = Ledger.open_existing(ctx.cfg.privacy.ledger, st.get("ledger_id"))  # type: ignore[arg-type]
    ledger.check_and_reserve(ctx.cfg.dataset_id, str(st["release_id"]), Fraction(str(st["rho"])),
                             Fraction(ctx.cfg.privacy.lifetime_rho), run=st.get("run_token"))  # type: ignore[arg-type]


def _check_rho(ctx: RunContext) -> None:
    """The ρ the run's strategies spend is the ρ it reserved (RunContext.load already refuses
    changed strategy files; this is the arithmetic check on top)."""
    have = total_rho(ctx.strategies)
    if have != Fraction(str(ctx.state["rho"])):
        raise RunDirError(f"{ctx.rd.root}: the run's strategies now spend rho {have}, but it reserved "
                          f"{ctx.state['rho']}; restore the strategy files or start a new run")


def _ledger_for_new_run(cfg: RunConfig) -> Ledger:
    """The ledger of a new run. A missing ledger is created only if no run of this dataset
    recorded it: a ledger that disappeared would otherwise reset the dataset's spent budget."""
    path = cfg.privacy.ledger
    if not path.exists() and cfg.output.runs_dir.is_dir():
        for state_path in cfg.output.runs_dir.glob("*/state.json"):
            try:
                st = json.loads(state_path.read_text())
            except (OSError, ValueError):
                continue
            if st.get("dataset_id") == cfg.dataset_id and st.get("ledger") == str(path):
                raise LedgerMissingError(
                    f"the privacy ledger {path} is missing, but run {state_path.parent} of dataset "
                    f"{cfg.dataset_id!r} recorded its spend there; restore the ledger from a backup — "
                    "a new, empty ledger would forget what was spent")
    return Ledger(path)


def check_config(config_path: str | Path) -> RunConfig:
    """Everything about a run config that can be checked without reading data or touching the
    ledger: it validates, its strategies fit the spec and geography, the lifetime budget is
    sane and the output folders can be written. Returns the loaded config."""
    cfg = load_config(config_path)
    _check_strategies_fit(cfg, configured_strategies(cfg))
    if Fraction(cfg.privacy.lifetime_rho) > MAX_LIFETIME_RHO:
        raise ConfigError(f"{cfg.source_path}: privacy.lifetime_rho {cfg.privacy.lifetime_rho!r} is above "
                          f"{MAX_LIFETIME_RHO} (ε in the thousands): not a meaningful privacy budget")
    for what, d in (("output.runs_dir", cfg.output.runs_dir), ("output.releases_dir", cfg.output.releases_dir),
                    ("privacy.ledger", cfg.privacy.ledger.parent)):
        _check_writable_dir(cfg, what, d)
    if cfg.execution.executor == "dask":
        _check_dask(cfg)
    return cfg


def _check_dask(cfg: RunConfig) -> None:
    """The Dask scheduler answers (before any budget is reserved, not 60 s into the run)."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError(f"{cfg.source_path}: execution.executor: dask needs the dask extra "
                          "(pip install 'dptab[dask]')") from None
    try:
        Client(cfg.execution.dask_address, timeout="10s", set_as_default=False).close()
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"{cfg.source_path}: execution.dask_address {cfg.execution.dask_address!r}: no Dask "
                          f"scheduler answers there ({type(exc).__name__}: {exc})") from None


def _check_release_id(cfg: RunConfig, release_id: str) -> None:
    """The release id is new: no release, no run directory of that id."""
    if (cfg.output.releases_dir / release_id).exists():
        raise ReleaseExistsError(f"release {release_id!r} already exists in {cfg.output.releases_dir}; "
                                 "releases are never overwritten")
    run_dir = cfg.output.runs_dir / release_id
    if (run_dir / "state.json").exists():
        raise RunExistsError(f"a run with release id {release_id!r} already exists at {run_dir}; continue it "
                             f"with `dptab run --resume {run_dir}`, or choose a new release_id")


def _check_writable_dir(cfg: RunConfig, what: str, d: Path) -> None:
    """``d`` exists (or can be made) as a writable directory; ConfigError naming the key if not."""
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{cfg.source_path}: {what} {d}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{cfg.source_path}: {what} {d}: {probe} is not writable")


class RunExistsError(RefusedError):
    """A run with this release id exists: resume it instead of starting over."""


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


def _resolved_config_text(cfg: RunConfig, release_id: str) -> str:
    """The config as run (paths resolved, the release id filled in), as YAML text."""
    data = cfg.model_dump(mode="json", exclude={"source_path"})
    data["release_id"] = release_id
    return yaml.safe_dump(data, sort_keys=False)


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
        persons, units = read_persons(cfg.inputs.persons), read_units(cfg.inputs.units)
    else:
        try:
            inputs = validate_inputs(cfg.inputs.persons, cfg.inputs.units, ctx.persons_spec)
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
        levels = load_geolevels(cfg.geography.levels)
        if cfg.geography.blocks is not None:  # a public list: every block, with units or not
            blocks = read_block_list(cfg.geography.blocks, units, levels[-1].digits)
        else:
            blocks = units.select("geoid").unique().sort("geoid").collect()
        write_parquet_atomic(blocks, ctx.rd.geography_path)
        geo = Geography.from_block_geoids(blocks["geoid"].to_numpy(), levels)
        person_hists = build_person_histograms(persons, geo, ctx.persons_spec)
        unit_counts = build_unit_counts(units, geo)
        written = [ctx.rd.geography_path]
        for lv in geo.levels:
            person_hists[lv.name].to_parquet(ctx.rd.truth_path("persons", lv.name))
            units_truth(unit_counts[lv.name]).to_parquet(ctx.rd.truth_path("units", lv.name))
            write_invariants(declared(lv.name, person_hists[lv.name], unit_counts[lv.name], cfg.invariants),
                             ctx.rd.invariants_path(lv.name), int(lv.n_units))
            written += [ctx.rd.truth_path("persons", lv.name), ctx.rd.truth_path("units", lv.name),
                        ctx.rd.invariants_path(lv.name)]
    info = {"levels": {lv.name: int(lv.n_units) for lv in geo.levels},
            "seconds": round(time.perf_counter() - t0, 3)}
    ctx.rd.mark_done("inputs", info, files=written)
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
    with private_files():
        info = solve_shard(ctx, kind, level, shard, shard_bounds(ctx, level), executor_for(ctx.cfg.execution.workers))
    ctx.rd.mark_done(stage, info, files=[ctx.rd.measurement_path(kind, level, shard),
                                         ctx.rd.solved_shard_path(kind, level, shard)])
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
    with private_files():
        summary = merge_level(ctx, kind, level, infos)
    ctx.rd.mark_done(stage, summary, files=[ctx.rd.solved_path(kind, level)])
    return summary


def _stage_shard_item(item: tuple[str, str, str, int]) -> dict[str, Any]:
    """One shard as a cluster task: ``(run_dir, kind, level, shard)``."""
    return stage_shard(*item)


def solve_levels(run_dir: str | Path,
                 each_level: Callable[[str, Any, Callable[[int], dict[str, Any]]], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Every step of :func:`plan`: its shards, then finish the level; returns the level
    summaries. Locally the shards run in this process (each spreading its parents over the
    run's worker pool) and ``each_level(label, shards, run_shard)`` may drive them (progress
    bars); with ``execution.executor: dask`` each shard is a task on the cluster."""
    ctx = RunContext.load(run_dir)
    dask = DaskExecutor(ctx.cfg.execution.dask_address) if ctx.cfg.execution.executor == "dask" else None
    summaries = []
    try:
        for step in plan(ctx):
            def run_shard(s: int, k: str = step.kind, lv: str = step.level) -> dict[str, Any]:
                return stage_shard(run_dir, k, lv, s)
            if dask is not None:
                dask.map(_stage_shard_item, [(str(run_dir), step.kind, step.level, s) for s in step.shards])
            elif each_level is None:
                for s in step.shards:
                    run_shard(s)
            else:
                each_level(f"{step.kind} {step.level}", list(step.shards), run_shard)
            summaries.append(stage_finish_level(run_dir, step.kind, step.level))
    finally:
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
    _check_rho(ctx)
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
