"""``dptab experiment CONFIG --trials N``: repeat noise + post-processing on the same histograms.

The true histograms are built once (a base run directory). Each *setting* — the config's
strategy, or one strategy per ``--strategy``, or the config's strategy rescaled to each
``--rho`` (same shares, exact fractions) — is run ``N`` times with seeded randomness
(seed = base seed + 1 + trial, the same in every setting: common random numbers make the
settings' differences less noisy), in a pool of worker processes. A trial runs the same stages as
``dptab run`` (pipeline/run.py: measure and post-process every level) but never publishes;
its metrics (pipeline/review/runner.py) are kept and its bulky files are removed.

Outputs, in ``EXP_DIR`` (default ``<runs_dir>/experiments/<dataset>-<time>``, mode 0700,
confidential like a run directory): ``trials.parquet`` (one metrics row per trial:
``setting, rho, epsilon, trial`` + the metrics columns), ``summary.parquet`` (``mean``, ``sd``,
``trials`` per setting and metric), ``summary.md`` (the headline tables) and ``report.html``
(accuracy-vs-ε table and plot).

Experiments spend no budget of the dataset's ledger: they are never published, and they use
a ledger private to the experiment directory. They are internal, like the review — see the
confidentiality rule in ``pipeline.review``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import polars as pl
import yaml

from pipeline.errors import InputError
from pipeline.job.executor import Executor
from pipeline.job.rundir import RunDir
from pipeline.job.stages import solve_levels
from pipeline.model.schemas import parse_yaml

EXPERIMENT_LIFETIME_RHO = "1000000"  # the experiment's own ledger: never the dataset's
DEFAULT_SEED = 20_200_401


class ExperimentError(InputError):
    """Bad experiment options (names the option)."""


@dataclass(frozen=True)
class Setting:
    """One experimental condition: a name, a strategy file or name, its total ρ and ε."""

    name: str
    strategy: str
    rho: str
    epsilon: float
    #: None: persons only (the default); False/True: with the units run, joint.households off/on
    joint: bool | None = None
    #: None: the config's ``postprocess.estimator``; else ``topdown`` or ``full``, with every
    #: answer measured so that both estimators see exactly the same noise draws
    estimator: str | None = None


def _scaled_strategy(base: str, rho: Fraction, out_dir: Path) -> Path:
    """Write a copy of strategy ``base`` whose global ρ is ``rho`` (shares unchanged)."""
    from pipeline.model.strategy import strategy_path

    raw = parse_yaml(strategy_path(base).read_text())
    raw["rho"] = f"{rho.numerator}/{rho.denominator}" if rho.denominator != 1 else str(rho.numerator)
    raw["name"] = f"{raw.get('name', 'strategy')}_rho_{float(rho):g}"
    raw["description"] = f"{raw.get('description', '')} (rescaled to rho = {rho} for an experiment)"
    p = out_dir / f"{raw['name']}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def make_settings(base_strategy: str, delta: float, rhos: list[str] | None, strategies: list[str] | None,
                  out_dir: Path, compare_joint: bool = False, compare_estimators: bool = False) -> list[Setting]:
    """The experimental settings: rescaled copies for ``rhos``, else ``strategies``, else the
    base; ``compare_joint``: the base strategy with persons and units solved independently
    (2020) and with ``joint.households``; ``compare_estimators``: the base strategy post-processed
    by ``topdown`` (2020) and by ``full`` (paired: trial t uses the same seed — and, for the
    estimators, the very same noise draws — in both)."""
    from pipeline.model.strategy import load_strategy
    from pipeline.privacy.accounting import cks_epsilon

    if rhos and strategies:
        raise ExperimentError("give --rho or --strategy, not both")
    if compare_estimators:
        if rhos or strategies or compare_joint:
            raise ExperimentError("--compare-estimators compares the config's strategy with itself; "
                                  "no --rho, --strategy or --compare-joint")
        s = load_strategy(base_strategy)
        eps = float(cks_epsilon(s.total_rho, str(delta)))
        return [Setting("topdown (2020)", base_strategy, str(s.total_rho), eps, estimator="topdown"),
                Setting("full (GLS)", base_strategy, str(s.total_rho), eps, estimator="full")]
    if compare_joint:
        if rhos or strategies:
            raise ExperimentError("--compare-joint compares the config's strategy with itself; no --rho or --strategy")
        s = load_strategy(base_strategy)
        eps = float(cks_epsilon(s.total_rho, str(delta)))
        return [Setting("independent (2020)", base_strategy, str(s.total_rho), eps, joint=False),
                Setting("joint households", base_strategy, str(s.total_rho), eps, joint=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen: list[tuple[str, str]] = []
    if rhos:
        for r in rhos:
            try:
                f = Fraction(r)
            except (ValueError, ZeroDivisionError):
                raise ExperimentError(f"--rho {r!r}: not a number or fraction") from None
            if f <= 0:
                raise ExperimentError(f"--rho {r!r}: must be > 0")
            chosen.append((f"rho={r}", str(_scaled_strategy(base_strategy, f, out_dir))))
    else:
        for s in strategies or [base_strategy]:
            chosen.append((Path(s).stem, s))
    out = []
    for name, path in chosen:
        s = load_strategy(path)
        out.append(Setting(name, path, str(s.total_rho), float(cks_epsilon(s.total_rho, str(delta)))))
    return out


def _trial_config(cfg_raw: dict[str, Any], exp_dir: Path, strategy: str, seed: int, release_id: str,
                  joint: bool | None = None, estimator: str | None = None, margin_trials: int | None = None) -> Path:
    """A run config for one trial (seeded, private ledger and folders): persons only, or with
    the config's units run and ``joint.households`` = ``joint`` when that is not None;
    ``estimator``: that estimator, with every answer measured (the same draws for both)."""
    c = dict(cfg_raw)
    if estimator is not None:
        c["postprocess"] = dict(c.get("postprocess") or {}, estimator=estimator)
    c["release_id"] = release_id
    units = (c.get("privacy") or {}).get("units_strategy") if joint is not None else None
    if joint is not None and not units:
        raise ExperimentError("--compare-joint needs the config's privacy.units_strategy")
    c["joint"] = {"households": bool(joint)}
    c["privacy"] = dict(c.get("privacy") or {}, strategy=strategy, units_strategy=units, randomness="seeded",
                        seed=seed, ledger=str(exp_dir / "ledger.sqlite"), lifetime_rho=EXPERIMENT_LIFETIME_RHO,
                        full_measurements=estimator is not None or bool((c.get("privacy") or {}).get("full_measurements")))
    c["output"] = dict(c.get("output") or {}, runs_dir=str(exp_dir / "runs"),
                       releases_dir=str(exp_dir / "never-published"))
    if margin_trials:
        c["output"].update(margins="simulated", margin_trials=margin_trials)
    c["execution"] = dict(c.get("execution") or {}, workers=1)
    p = exp_dir / "configs" / f"{release_id}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(c, sort_keys=False))
    return p


def _link_inputs(base_run: Path, run_dir: Path) -> list[Path]:
    """Give a trial the base run's inputs stage — geography, true histograms, invariants — by
    hard links (copies across filesystems); the trial draws its own noise on the same truth."""
    base, trial = RunDir(base_run), RunDir(run_dir)
    files = [base.geography_path] + sorted(base.truth_path("persons", "x").parent.iterdir()) \
        + sorted(base.invariants_path("x").parent.iterdir())
    out = []
    for f in files:
        dst = trial.root / f.relative_to(base.root)
        dst.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)
        out.append(dst)
    return out


def _run_trial_item(item: tuple[str, str]) -> str:
    return run_trial(*item)


def run_trial(run_dir: str, base_run: str, keep: bool = False) -> str:
    """One trial in a prepared run directory: link the true histograms, measure and
    post-process every level, then the metrics; returns the metrics file's path."""
    from pipeline.review.runner import compute_review

    run_dir = Path(run_dir)
    linked = _link_inputs(Path(base_run), run_dir)
    RunDir.open(run_dir).mark_done("inputs", RunDir.open(Path(base_run)).done_info("inputs") or {}, files=linked)
    solve_levels(run_dir)
    from pipeline.job.margins import stage_margins

    stage_margins(run_dir)  # simulated margins of error, when the trial's config asks for them
    metrics = compute_review(run_dir).metrics
    out = RunDir(Path(run_dir)).trials_path()
    out.parent.mkdir(exist_ok=True)
    metrics.write_parquet(out)
    if not keep:
        shutil.rmtree(run_dir)
    return str(out)


def summarise(trials: pl.DataFrame) -> pl.DataFrame:
    """Mean, standard deviation (ddof 1; NaN for one trial) and trial count per setting × metric row."""
    keys = ["setting", "rho", "epsilon", "level", "statistic", "metric", "size_bin", "estimator"]
    return (trials.filter(pl.col("value").is_not_nan())
            .group_by(keys, maintain_order=True)
            .agg(pl.col("value").mean().alias("mean"), pl.col("value").std(ddof=1).fill_null(float("nan")).alias("sd"),
                 pl.len().alias("trials"))
            .sort(["epsilon", "level", "statistic", "metric", "size_bin", "estimator"]))


def run_experiment(config_path: str | Path, trials: int, rhos: list[str] | None = None,
                   strategies: list[str] | None = None, workers: int = 2, out_dir: str | Path | None = None,
                   seed: int = DEFAULT_SEED, progress: Callable[[str, int, int], None] | None = None,
                   compare_joint: bool = False, compare_estimators: bool = False,
                   margin_trials: int | None = None) -> Path:
    """Run every setting ``trials`` times; write trials/summary Parquet and the report; return EXP_DIR."""
    from pipeline.job import stages as runmod
    from pipeline.model.config import load_config
    from pipeline.review.report import write_experiment_report

    if trials < 1:
        raise ExperimentError("--trials must be >= 1")
    cfg = load_config(config_path)
    cfg_raw = cfg.model_dump(mode="json", exclude={"source_path"})
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    exp_dir = Path(out_dir) if out_dir else cfg.output.runs_dir / "experiments" / f"{cfg.dataset_id}-{stamp}"
    if exp_dir.exists():
        raise ExperimentError(f"--out {exp_dir}: already exists; experiments never overwrite")
    exp_dir.mkdir(parents=True, mode=0o700)
    os.chmod(exp_dir, 0o700)
    settings = make_settings(cfg.privacy.strategy, cfg.privacy.delta, rhos, strategies, exp_dir / "strategies",
                             compare_joint=compare_joint, compare_estimators=compare_estimators)
    t0 = time.perf_counter()
    base_cfg = _trial_config(cfg_raw, exp_dir, cfg.privacy.strategy, seed, "base")
    base_run = runmod.prepare(base_cfg)
    runmod.stage_inputs(base_run)
    jobs = []
    for si, s in enumerate(settings):
        for t in range(trials):
            rid = f"s{si:02d}-t{t:03d}"
            # prepared here, one after another: the experiment ledger is written by this process only
            trial_cfg = _trial_config(cfg_raw, exp_dir, s.strategy, seed + 1 + t, rid, joint=s.joint,
                                      estimator=s.estimator, margin_trials=margin_trials)
            jobs.append((s, t, str(runmod.prepare(trial_cfg)), rid))
    frames = []
    # trials are independent: the run's one executor spreads them over its worker processes
    executor = Executor(max(1, min(workers, len(jobs))))
    try:
        paths = executor.map(_run_trial_item, [(p, str(base_run)) for _, _, p, _ in jobs],
                             on_done=None if progress is None else lambda k, n: progress("experiment: trials", k, n))
    finally:
        executor.close()
    for (s, t, _, _), path in zip(jobs, paths):
        m = pl.read_parquet(path)
        frames.append(m.with_columns(pl.lit(s.name).alias("setting"), pl.lit(s.rho).alias("rho"),
                                     pl.lit(s.epsilon).alias("epsilon"), pl.lit(t).alias("trial")))
    all_trials = pl.concat(frames, how="vertical")
    all_trials.write_parquet(exp_dir / "trials.parquet")
    summary = summarise(all_trials)
    summary.write_parquet(exp_dir / "summary.parquet")
    info = {"dataset": cfg.dataset_id, "config": str(cfg.source_path), "trials per setting": trials,
            "settings": ", ".join(f"{s.name} (ρ={s.rho}, ε={s.epsilon:.3f})" for s in settings),
            "base seed": seed, "workers": workers, "wall seconds": round(time.perf_counter() - t0, 1)}
    from pipeline.review.markdown import MARGINS, experiment_markdown
    from pipeline.review.paired import comparison_markdown, coverage_table, paired_differences

    md = experiment_markdown(summary)
    levels = [lv for lv in ("nation", "state", "county", "tract", "block_group", "block")
              if lv in set(summary["level"].to_list())] or list(dict.fromkeys(summary["level"].to_list()))
    paired = None
    if len(settings) == 2:  # paired settings (same seeds): the trial-by-trial differences
        a, b = settings[0].name, settings[1].name
        paired = paired_differences(all_trials, a, b)
        paired.write_parquet(exp_dir / "paired.parquet")
        for metric in ("rmse", "mae"):
            md += (f"\n\n**{metric.upper()} of the published counts, paired over {trials} trials**\n\n"
                   + comparison_markdown(paired, a, b, levels, MARGINS, metric))
    from pipeline.review.paired import bias_notes

    (exp_dir / "bias.yaml").write_text(yaml.safe_dump(
        {"dataset": cfg.dataset_id, "settings": [bias_notes(summary, s.name, levels) for s in settings]},
        sort_keys=False, allow_unicode=True))
    coverage = coverage_table(summary, levels)
    if coverage.height:
        coverage.write_parquet(exp_dir / "coverage.parquet")
        md += ("\n\n**Coverage of the published count ± moe90 (all table lines pooled), mean ± sd over trials**\n\n"
               "| setting | level | true size | coverage % | median moe90 | cells per trial |\n|---|---|---|---|---|---|\n"
               + "\n".join(f"| {r['setting']} | {r['level']} | {r['size_bin']} | {100 * r['coverage']:.1f} ± "
                           f"{100 * r['sd'] if r['sd'] == r['sd'] else float('nan'):.1f} | {r['median_moe90']:.2f} | "
                           f"{r['cells']:.0f} |" for r in coverage.iter_rows(named=True)))
    write_experiment_report(exp_dir / "report.html", summary, info, confidential=cfg.confidential,
                            paired=None if paired is None else (settings[0].name, settings[1].name, paired),
                            coverage=coverage)
    (exp_dir / "summary.md").write_text(md)
    shutil.rmtree(RunDir(base_run).root / "measurements", ignore_errors=True)
    return exp_dir
