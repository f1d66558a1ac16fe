"""The whole job as resumable stages: ``dptab run CONFIG`` and the Prefect flow call these.

Order (ARCHITECTURE §1): prepare (ledger check before any data is read, run directory) →
inputs (validate, histograms per level) → for each run kind (persons, units) and level,
top-down, per shard: measure (write-once) → post-process → checkpoint → finish level
(merge shards, check parent sums) → publish (tables, microdata, release) → ledger commit.

Every stage takes the run directory and returns a small JSON-able manifest; state lives in
files under the run directory, recorded in ``state.json`` only once written, so a stage
that is re-entered (resume, retry) does nothing or redoes only the unfinished shard. Noise
is keyed by (release key, run kind, level, shard) and measurement files are write-once, so a
re-entered shard re-reads its measurements instead of drawing new ones.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import RunConfig, load_config
from pipeline.release import ReleaseExistsError
from pipeline.rundir import RunDir, new_run_id
from pipeline.spec import HistogramSpec, load_spec

RUN_KINDS = ("persons", "units")


# --------------------------------------------------------------------------------------
# context


@dataclass
class RunContext:
    """Everything a stage needs, rebuilt from the run directory (no hidden process state)."""

    rd: RunDir
    cfg: RunConfig

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunContext":
        rd = RunDir.open(Path(run_dir))
        cfg = load_config(rd.root / "config.yaml")
        return cls(rd, cfg)

    @cached_property
    def state(self) -> dict[str, Any]:
        return self.rd.state()

    @cached_property
    def persons_spec(self) -> HistogramSpec:
        return load_spec(self.cfg.spec)

    @cached_property
    def units_spec(self) -> HistogramSpec:
        return load_spec("units")

    def spec(self, kind: str) -> HistogramSpec:
        return self.persons_spec if kind == "persons" else self.units_spec

    @cached_property
    def strategies(self) -> dict[str, Any]:
        from pipeline.privacy.accounting import load_strategy

        out = {"persons": load_strategy(self.cfg.privacy.strategy)}
        if self.cfg.privacy.units_strategy:
            out["units"] = load_strategy(self.cfg.privacy.units_strategy)
        return out

    @cached_property
    def geography(self):
        from pipeline.geography import Geography
        import polars as pl

        blocks = pl.read_parquet(self.rd.root / "histograms" / "blocks.parquet")["geoid"].to_numpy()
        return Geography.from_block_geoids(blocks)

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.geography.levels]

    def source(self, kind: str, level: str, shard: int):
        """The randomness source of one shard: keyed by the release key, or seeded for tests."""
        from pipeline.privacy import randomness

        mode = self.cfg.privacy.randomness
        if mode == "seeded":
            return randomness.seeded_source_for(self.cfg.privacy.seed, kind, level, shard)
        if mode == "keyed":
            key = randomness.load_key(self.rd.root / "noise.key")
            return randomness.keyed_source(key, kind, level, str(shard))
        return randomness.secure_source()


def _total_rho(strategies: dict[str, Any]) -> Fraction:
    return sum((s.total_rho for s in strategies.values()), Fraction(0))


# --------------------------------------------------------------------------------------
# prepare


def prepare(config_path: str | Path, resume_dir: str | Path | None = None) -> Path:
    """Create (or reopen, on resume) the run directory; refuse overspending before reading data.

    The ledger check happens here, before any confidential file is opened, and reserves the
    run's ρ for the dataset; a release id that already exists is refused.
    """
    if resume_dir is not None:
        rd = RunDir.open(Path(resume_dir))
        return rd.root
    cfg = load_config(config_path)
    release_id = cfg.release_id or new_run_id(cfg.dataset_id)
    if (cfg.output.releases_dir / release_id).exists():
        raise ReleaseExistsError(f"release {release_id!r} already exists in {cfg.output.releases_dir}; "
                                 "releases are never overwritten")
    from pipeline.privacy.accounting import load_strategy
    from pipeline.privacy.ledger import Ledger

    strategies = [load_strategy(cfg.privacy.strategy)]
    if cfg.privacy.units_strategy:
        strategies.append(load_strategy(cfg.privacy.units_strategy))
    rho = sum((s.total_rho for s in strategies), Fraction(0))
    Ledger(cfg.privacy.ledger).check_and_reserve(
        cfg.dataset_id, release_id, rho, Fraction(cfg.privacy.lifetime_rho)
    )
    stale = cfg.output.runs_dir / release_id
    if stale.is_dir() and not (stale / "state.json").exists():
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
    _write_resolved_config(cfg, rd.root / "config.yaml")
    if cfg.privacy.randomness == "keyed":
        from pipeline.privacy import randomness

        randomness.create_key(rd.root / "noise.key")
    return rd.root


def _write_resolved_config(cfg: RunConfig, path: Path) -> None:
    import yaml

    data = cfg.model_dump(mode="json", exclude={"source_path"})
    data["release_id"] = path.parent.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------------------
# inputs -> histograms


def stage_inputs(run_dir: str | Path) -> dict[str, Any]:
    """Validate the inputs and build the true histograms of every level (confidential)."""
    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("inputs"):
        return ctx.rd.done_info("inputs") or {}
    from pipeline.geography import Geography
    from pipeline.histograms import build_person_histograms, build_unit_counts
    from pipeline.io import validate_inputs, write_parquet_atomic

    t0 = time.perf_counter()
    inputs = validate_inputs(ctx.cfg.inputs.persons, ctx.cfg.inputs.units, ctx.persons_spec)
    # The geography comes from the units file (public: every block with a housing unit or a
    # facility); validation guarantees every person's block is in it.
    blocks = inputs.units.select("geoid").unique().sort("geoid").collect()
    hdir = ctx.rd.root / "histograms"
    hdir.mkdir(exist_ok=True)
    write_parquet_atomic(blocks, hdir / "blocks.parquet")
    geo = Geography.from_block_geoids(blocks["geoid"].to_numpy())
    person_hists = build_person_histograms(inputs.persons, geo, ctx.persons_spec)
    unit_counts = build_unit_counts(inputs.units, geo)
    for level, h in person_hists.items():
        h.to_parquet(hdir / f"persons_{level}.parquet")
    for level, u in unit_counts.items():
        write_parquet_atomic(_unit_counts_frame(u), hdir / f"units_{level}.parquet")
    info = {"levels": {lv.name: int(lv.n_units) for lv in geo.levels},
            "seconds": round(time.perf_counter() - t0, 3)}
    ctx.rd.mark_done("inputs", info)
    return info


def _unit_counts_frame(u) -> Any:
    import polars as pl

    cols = {"housing_units": u.housing_units, "occupied": u.occupied}
    for g in range(u.facilities.shape[1]):
        cols[f"facilities_{g + 1}"] = u.facilities[:, g]
    return pl.DataFrame(cols)


def load_unit_counts(ctx: RunContext, level: str) -> dict[str, np.ndarray]:
    """Public invariants of one level: housing units (n,), facilities (n, 7); and occupied (n,)
    — occupied is confidential and is used only as the units run's true histogram."""
    import polars as pl

    df = pl.read_parquet(ctx.rd.root / "histograms" / f"units_{level}.parquet")
    fac = np.stack([df[f"facilities_{g}"].to_numpy() for g in range(1, 8)], axis=1).astype(np.int64)
    return {"housing_units": df["housing_units"].to_numpy().astype(np.int64),
            "occupied": df["occupied"].to_numpy().astype(np.int64), "facilities": fac}


# --------------------------------------------------------------------------------------
# shards


def run_kinds(run_dir: str | Path) -> list[str]:
    ctx = RunContext.load(run_dir)
    return [k for k in RUN_KINDS if k in ctx.strategies]


def run_levels(run_dir: str | Path) -> list[str]:
    return RunContext.load(run_dir).level_names


def _shard_bounds(ctx: RunContext, level: str) -> np.ndarray:
    """Parent-index boundaries of the shards of ``level`` (deterministic from the geography).

    A shard is a contiguous range of parents whose children x cells add up to about
    ``execution.shard_target_cells`` (10–120 s of work); the nation level is one shard.
    """
    names = ctx.level_names
    i = names.index(level)
    if i == 0:
        return np.array([0, 1], dtype=np.int64)
    parent = ctx.geography.levels[i - 1]
    n_children = np.diff(parent.child_ptr)
    work = np.cumsum(n_children * 2016)
    target = ctx.cfg.execution.shard_target_cells
    cuts = np.searchsorted(work, np.arange(target, work[-1], target), side="left") + 1
    return np.unique(np.concatenate([[0], cuts, [parent.n_units]])).astype(np.int64)


def level_shards(run_dir: str | Path, kind: str, level: str) -> list[int]:
    """Shard indices of one (kind, level)."""
    ctx = RunContext.load(run_dir)
    return list(range(len(_shard_bounds(ctx, level)) - 1))


# --------------------------------------------------------------------------------------
# one shard: measure -> post-process


def _shard_stage(kind: str, level: str, shard: int) -> str:
    return f"shard:{kind}:{level}:{shard:05d}"


def _solved_shard_path(ctx: RunContext, kind: str, level: str, shard: int) -> Path:
    return ctx.rd.root / "solved" / kind / level / f"shard-{shard:05d}.parquet"


def _measure_path(ctx: RunContext, kind: str, level: str, shard: int) -> Path:
    return ctx.rd.root / "measurements" / kind / level / f"shard-{shard:05d}.parquet"


def stage_shard(run_dir: str | Path, kind: str, level: str, shard: int) -> dict[str, Any]:
    """Measure (write-once) and post-process one shard of parents; checkpoint its output."""
    ctx = RunContext.load(run_dir)
    stage = _shard_stage(kind, level, shard)
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    from pipeline.shard_solve import solve_shard

    info = solve_shard(ctx, kind, level, shard, _shard_bounds(ctx, level),
                       _measure_path(ctx, kind, level, shard), _solved_shard_path(ctx, kind, level, shard))
    ctx.rd.mark_done(stage, info)
    return info


def stage_finish_level(run_dir: str | Path, kind: str, level: str) -> dict[str, Any]:
    """Merge a level's shards into ``solved/<kind>_<level>.parquet`` and check parent sums."""
    ctx = RunContext.load(run_dir)
    stage = f"level:{kind}:{level}"
    if ctx.rd.is_done(stage):
        return ctx.rd.done_info(stage) or {}
    from pipeline.shard_solve import merge_level

    n = len(_shard_bounds(ctx, level)) - 1
    parts = [_solved_shard_path(ctx, kind, level, s) for s in range(n)]
    infos = [ctx.rd.done_info(_shard_stage(kind, level, s)) or {} for s in range(n)]
    summary = merge_level(ctx, kind, level, parts, infos, ctx.rd.root / "solved" / f"{kind}_{level}.parquet")
    ctx.rd.mark_done(stage, summary)
    return summary


# --------------------------------------------------------------------------------------
# publish


def stage_publish(run_dir: str | Path) -> dict[str, Any]:
    """Tables, microdata and the release folder; then the ledger records the spend."""
    ctx = RunContext.load(run_dir)
    if ctx.rd.is_done("publish"):
        return ctx.rd.done_info("publish") or {}
    from pipeline.publish import adopt_existing_release, publish_release

    # a run killed after the release was renamed into place but before this stage was
    # recorded: the folder is ours if its manifest names this run and it verifies
    t0 = time.perf_counter()
    info = adopt_existing_release(ctx) or publish_release(ctx)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    from pipeline.privacy.ledger import Ledger

    Ledger(ctx.cfg.privacy.ledger).commit(ctx.cfg.dataset_id, ctx.state["release_id"])
    ctx.rd.mark_done("publish", info)
    return info


def review_run(run_dir: str | Path) -> Path:
    """Write the internal review (metrics + report) of a finished run; returns the report path."""
    from pipeline.review import review_run_dir

    return Path(review_run_dir(Path(run_dir)))


# --------------------------------------------------------------------------------------
# the whole job without Prefect


def run(config_path: str | Path | None = None, resume_dir: str | Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a whole release job in this process; returns the publish manifest."""
    from pipeline.progress import StageProgress

    t0 = time.perf_counter()
    run_dir = prepare(config_path, resume_dir=resume_dir) if resume_dir is None else RunDir.open(Path(resume_dir)).root
    with StageProgress(enabled=progress) as prog:
        prog.step("validate + histograms", lambda: stage_inputs(run_dir))
        diagnostics = []
        for kind in run_kinds(run_dir):
            for level in run_levels(run_dir):
                shards = level_shards(run_dir, kind, level)
                prog.shards(f"{kind} {level}", shards, lambda s, k=kind, lv=level: stage_shard(run_dir, k, lv, s))
                diagnostics.append(stage_finish_level(run_dir, kind, level))
        published = prog.step("publish", lambda: stage_publish(run_dir))
    published = dict(published)
    published["run_dir"] = str(run_dir)
    published["levels"] = diagnostics
    published["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return published


def run_job_for_cli(config_path: str | None, resume_dir: str | None, *, flow: bool = False,
                    task_runner: str = "thread", dask_address: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """``dptab run``: the job in-process (default) or as the Prefect flow; returns the closing
    summary: levels, units, ρ and ε, wall time, peak memory, release path."""
    import resource

    t0 = time.perf_counter()
    if flow:
        import os

        # the first start of an ephemeral API server on a busy 2-core machine can take > 20 s
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        from flows.tabulate import with_runner

        out = with_runner(task_runner, dask_address)(config_path=str(config_path) if config_path else "",
                                                     resume_dir=resume_dir)
    else:
        out = run(config_path, resume_dir=resume_dir, progress=progress)
    ctx = RunContext.load(out["run_dir"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    units = ctx.rd.done_info("inputs") or {}
    return {
        "release": out.get("release_path") or out.get("release"),
        "run directory": out["run_dir"],
        "levels": ", ".join(f"{lv} {units.get('levels', {}).get(lv)}" for lv in ctx.level_names),
        "rho": f"{float(Fraction(out['rho'])):.4f} (exact {out['rho']})",
        "epsilon": f"{float(Fraction(out['epsilon'])):.2f} at delta {ctx.cfg.privacy.delta:g} (exact upper bound {out['epsilon']})",
        "wall time (s)": round(time.perf_counter() - t0, 1),
        "peak memory (MB)": round(peak_mb),
    }
