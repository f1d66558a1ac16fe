"""Publish a finished run: gather the published histograms, declared invariants and privacy
parameters from the run directory and hand them to :func:`pipeline.release.write_release`.

Only the post-processed histograms (``solved/``), the noisy measurements and the declared
invariants are read here — never the confidential true histograms beyond the invariants the
config declares public (state totals, block housing units).
"""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from pipeline.job.context import RunContext
from pipeline.job.plan import plan
from pipeline.model.design import design
from pipeline.model.histogram import HistogramRows
from pipeline.release.checks import Invariants


def git_commit() -> str | None:
    """The source tree's git commit, when it is a git checkout (recorded in the manifest)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def declared_invariants(ctx: RunContext) -> Invariants:
    """The public invariants the release states and checks: state totals and block housing
    units, as declared (read from ``invariants/``, never from a confidential file); the blocks
    by their integer codes (a lookup geography's by their names)."""
    from pipeline.inputs.invariants import read_invariants

    geo = ctx.geography
    # the blocks' housing units alone, read here rather than through the run context's cache,
    # which would keep the whole block level's invariants while the release is written
    block = read_invariants(geo.blocks.name, ctx.rd.verified(ctx.rd.invariants_path(geo.blocks.name)),
                            housing_units_only=True)
    state_totals = None
    # a lookup geography declares its top level's total; another digit-prefix hierarchy without a
    # "state" level publishes no state totals
    tl = geo.levels[0].name if geo.is_lookup else "state"
    state = ctx.invariants(tl) if tl in ctx.level_names else None
    if state is not None and state.persons is not None:
        state_totals = {str(g): int(t) for g, t in zip(geo.level(tl).geoids, state.persons)}
    hu = block.housing_units
    # a digit-prefix geography's blocks by their codes: the writer makes their GEOID strings (~60
    # bytes a block, ~0.5 GB for the US) a chunk at a time, never the whole level's
    blocks = geo.blocks.geoids if geo.blocks.is_lookup else geo.blocks.codes
    return Invariants(state_totals=state_totals, block_geoids=blocks if hu is not None else None,
                      block_housing_units=hu)


def privacy_markdown(privacy: dict[str, Any]) -> str:
    """A markdown table of ρ per level × query and the totals (for the Prefect artifact)."""
    lines = ["| run | level | query | rho |", "|---|---|---|---|"]
    for kind, r in privacy["runs"].items():
        for level, qs in r["rho_by_level_query"].items():
            for q, rho in qs.items():
                lines.append(f"| {kind} | {level} | {q} | {float(Fraction(rho)):.6g} |")
    lines.append("")
    lines.append(f"Total rho = {privacy['rho']} (~{float(Fraction(privacy['rho'])):.4f}); "
                 f"epsilon = {float(Fraction(privacy['epsilon']['cks2020'])):.2f} at delta = {privacy['delta']} "
                 "(zCDP to (epsilon, delta) conversion of Canonne, Kamath & Steinke 2020); "
                 f"{float(Fraction(privacy['epsilon']['pld'])):.2f} from the privacy-loss distribution "
                 "of the composed discrete Gaussian mechanisms.")
    return "\n".join(lines)


def publish_release(ctx: RunContext, before_publish: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the release folder for a run whose levels are all finished; returns a manifest.
    ``before_publish`` runs right before the finished folder is renamed into place."""
    from pipeline import __version__
    from pipeline.release.manifest import ReleaseMetadata, privacy_parameters
    from pipeline.release.writer import write_release
    state = ctx.state
    kinds = [k for k in ("persons", "units") if k in ctx.strategies]
    # each level's histogram is read a chunk of units at a time while the release is written
    persons = {lv: HistogramRows(ctx.rd.verified(ctx.rd.solved_path("persons", lv))) for lv in ctx.level_names}
    units = ({lv: HistogramRows(ctx.rd.verified(ctx.rd.solved_path("units", lv))) for lv in ctx.level_names}
             if "units" in kinds else None)
    privacy = privacy_parameters({k: ctx.strategies[k] for k in kinds}, ctx.cfg.privacy.delta)
    variances = design({k: ctx.strategies[k] for k in kinds}).variances()
    meas = None
    if ctx.cfg.output.publish_measurements:
        # exactly the shards of the plan, each the file its stage recorded (the writer hashes
        # each as it copies it and compares with the run's record): a missing or edited shard
        # file stops the release instead of silently dropping or changing rows
        meas = {(step.kind, step.level): [ctx.rd.measurement_path(step.kind, step.level, s) for s in step.shards]
                for step in plan(ctx) if step.action == "solve"}
    meta = ReleaseMetadata(release_id=state["release_id"], dataset_id=ctx.cfg.dataset_id,
                           software_version=__version__, config_hash=state["config_hash"],
                           git_commit=git_commit(),
                           seed=ctx.cfg.privacy.seed if ctx.cfg.privacy.randomness == "seeded" else None,
                           randomness=ctx.cfg.privacy.randomness, title=ctx.cfg.title,
                           joint_households=ctx.cfg.joint.households, estimator=ctx.cfg.postprocess.estimator,
                           joint_relaxed=any((ctx.rd.done_info(f"level:persons:{lv}") or {}).get("fallbacks", 0)
                                             for lv in ctx.level_names))
    unbiased = None
    if ctx.cfg.postprocess.estimator == "full":
        from pipeline.job.estimate import LineEstimates

        # read a (table, level) at a time as the unbiased tables are written, not held
        unbiased = LineEstimates(ctx, kinds)
    simulated = None
    if ctx.cfg.output.margins == "simulated":
        import polars as pl

        simulated = (pl.read_parquet(ctx.rd.verified(ctx.rd.simulated_margins_path)),
                     pl.read_parquet(ctx.rd.verified(ctx.rd.moving_cells_path)), ctx.cfg.output.margin_trials)
    path = write_release(ctx.cfg.output.releases_dir, meta, ctx.geography, persons, units,
                         declared_invariants(ctx), privacy, variances=variances, measurement_files=meas,
                         copy_measurement_file=ctx.rd.copy_verified,
                         csv=ctx.cfg.output.csv, unbiased=unbiased, simulated=simulated,
                         before_publish=before_publish, tables=ctx.cfg.tables, workers=ctx.cfg.execution.workers)
    return {"release_id": meta.release_id, "release_path": str(path), "release_uri": path.resolve().as_uri(),
            "rho": privacy["rho"], "epsilon": privacy["epsilon"]["cks2020"],
            "privacy_markdown": privacy_markdown(privacy)}


def remove_partial_releases(ctx: RunContext) -> list[Path]:
    """Delete the hidden ``releases/.<id>.tmp-*`` folders of earlier attempts of this run that
    were killed while writing (never public: only a finished, verified folder is renamed to
    ``releases/<id>``). Returns what was removed."""
    import shutil

    release_id = str(ctx.state["release_id"])
    gone = []
    for d in sorted(ctx.cfg.output.releases_dir.glob(f".{release_id}.tmp-*")):
        if d.is_dir():
            shutil.rmtree(d)
            gone.append(d)
    return gone


def adopt_existing_release(ctx: RunContext) -> dict[str, Any] | None:
    """The manifest of this run's own release if it is already in place and verifies, else None.

    Raises :class:`pipeline.release.ReleaseExistsError` when a release with this id exists but
    belongs to another run (different config hash) — it is never overwritten.
    """
    import json

    from pipeline.release.manifest import ReleaseExistsError
    from pipeline.release.verify import verify_release

    path = ctx.cfg.output.releases_dir / ctx.state["release_id"]
    if not path.exists():
        return None
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
    if manifest.get("config_hash") != ctx.state["config_hash"] or verify_release(path):
        raise ReleaseExistsError(f"release {path} exists and is not this run's verified release; not overwritten")
    privacy = manifest["privacy"]
    return {"release_id": path.name, "release_path": str(path), "release_uri": path.resolve().as_uri(),
            "rho": privacy["rho"], "epsilon": privacy["epsilon"]["cks2020"],
            "privacy_markdown": privacy_markdown(privacy)}
