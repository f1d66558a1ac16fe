"""The ``dptab`` command line. Each command is a thin wrapper over library functions.

Exit status: 0 success, 2 invalid input or configuration (nothing later runs), 1 other errors.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from rich.console import Console


def _console(stderr: bool = False) -> "Console":
    """A console that never wraps or cuts messages when its output is not a terminal (logs,
    cron mail, CI): there the width is generous and long lines stay whole, so file paths do too."""
    import sys

    from rich.console import Console

    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty else 200)


def _flags_as_flags(params: list[Any]) -> list[Any]:
    """Boolean flags show as flags in ``--help`` (``--quiet``, not ``--quiet <bool>``).

    (Typer carries its own copy of click, so options are recognised by their ``is_flag``.)"""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))


def _examples(*lines: str) -> str:
    """The ``Examples`` epilog of a command's ``--help``: one command per line, verbatim."""
    return "\b\nExamples:\n" + "\n".join(f"  {ln}" for ln in lines)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="Differentially private tabulation: formally private, consistent census count tables.",
                  epilog=_examples("dptab run configs/demo.yaml            # the whole job on the demo config",
                                   "dptab verify releases/<release-id>     # check a downloaded release",
                                   "dptab COMMAND --help                   # every command has examples"))


def _command(name: str, *examples: str) -> Any:
    return app.command(name, cls=_Command, epilog=_examples(*examples))


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"dptab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the dptab version and exit")) -> None:
    """Differentially private tabulation: formally private, consistent census count tables."""


def _fail(exc: Exception) -> NoReturn:
    """Print an error and exit with its status: every library error carries its own
    (``pipeline.errors``: 2 for input, configuration and refusals — nothing later ran — 1 for
    failures while working); anything else is 1. Data values inside the message are printed as
    text, never as console markup."""
    from rich.markup import escape

    from pipeline.errors import DptabError

    _console(stderr=True).print(f"[red]{type(exc).__name__}:[/red] {escape(str(exc))}")
    raise typer.Exit(exc.exit_status if isinstance(exc, DptabError) else 1)


@_command("run",
          'dptab run configs/demo.yaml',
          'dptab run my-job.yaml --quiet            # no progress bars (logs, cron)',
          'dptab run --resume runs/<run-id>         # after a crash or kill',
          'dptab run my-job.yaml --flow             # as the Prefect flow dp-tabulate')
def run_cmd(
    config: str = typer.Argument(None, help="run config YAML (omit with --resume)"),
    resume: str = typer.Option(None, "--resume", help="continue the run in this run directory"),
    flow: bool = typer.Option(False, "--flow", help="run as a Prefect flow (ephemeral API unless PREFECT_API_URL is set)"),
    task_runner: str = typer.Option(None, "--task-runner",
                                    help="thread or dask (with --flow; default: the config's execution.task_runner)"),
    dask_address: str = typer.Option(None, "--dask-address",
                                     help="tcp://scheduler:8786 of an existing Dask cluster (default: execution.dask_address)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    plan_only: bool = typer.Option(False, "--plan", help="print the work list (levels, shards, answers drawn), the "
                                   "budget check and a rough time and memory, then stop (nothing reserved or written)"),
) -> None:
    """Run (or resume) a release job: validate, histograms, noise, top-down, publish."""
    import time

    from rich.table import Table

    from pipeline.job.stages import closing_summary, run

    if config is None and resume is None:
        raise typer.BadParameter("give a CONFIG or --resume RUN_DIR")
    if plan_only:
        if config is None:
            raise typer.BadParameter("--plan sizes a new run: give a CONFIG")
        _print_plan(config)
        return
    console = _console()
    t0 = time.perf_counter()
    try:
        if flow or task_runner is not None or dask_address is not None:
            out = _run_flow(config, resume, task_runner, dask_address)
        else:
            out = run(config, resume_dir=resume, progress=not quiet)
        summary = closing_summary(out, t0)
    except Exception as exc:  # library errors carry their exit status (pipeline.errors)
        _fail(exc)
    table = Table(title="dptab run summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)


def _print_plan(config: str) -> None:
    """``dptab run CONFIG --plan``: the sizing of :mod:`pipeline.job.sizing`."""
    from rich.table import Table

    from pipeline.job.sizing import plan_run

    try:
        sizing = plan_run(config)
    except Exception as exc:
        _fail(exc)
    console = _console()
    table = Table(title=f"dptab run --plan {config}")
    for col in ("kind", "level", "units", "parents", "shards", "largest shard (children x cells)", "answers drawn"):
        table.add_column(col, justify="left" if col in ("kind", "level") else "right")
    for s in sizing.steps:
        table.add_row(s.kind, s.level, f"{s.units:,}", f"{s.parents:,}", f"{s.shards:,}",
                      f"{s.largest_shard_cells:,}", f"{s.answers:,}" + ("" if sizing.estimator == "full" else " (at most)"))
    console.print(table)
    fits = sizing.rho <= sizing.budget_left
    console.print(f"persons {sizing.persons:,}, blocks {sizing.blocks:,}, estimator {sizing.estimator}, "
                  f"workers {sizing.workers}")
    console.print(f"budget: this run spends rho ~ {float(sizing.rho):.4g}; the dataset has ~ "
                  f"{float(sizing.budget_left):.4g} of its lifetime {float(sizing.lifetime_rho):.4g} left: "
                  + ("fits" if fits else "[red]the run would be refused[/red]"))
    wall = f"{sizing.seconds / 60:.0f} min" if sizing.seconds >= 120 else f"{sizing.seconds:.0f} s"
    console.print(f"rough estimate on a 2-core machine: {wall} wall, {sizing.peak_gb:.1f} GB peak memory "
                  "(model from BENCHMARKS.md, +-50%)")


def _run_flow(config: str | None, resume: str | None, task_runner: str | None,
              dask_address: str | None) -> dict:
    """``dptab run --flow``: the same job as the Prefect flow ``dp-tabulate``. The task runner
    and Dask address default to the config's ``execution`` section."""
    import os

    from pipeline.job.context import RunContext
    from pipeline.model.config import ConfigError, load_config

    if config is not None:
        execution = load_config(config).execution
    else:
        execution = RunContext.load(resume).cfg.execution
    runner = task_runner or execution.task_runner
    if runner not in ("thread", "dask"):
        raise ConfigError(f"--task-runner must be 'thread' or 'dask', not {runner!r}")
    # the first start of an ephemeral API server on a busy 2-core machine can take > 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.tabulate import api_for_workers, with_runner  # the CLI is a roof: it may start the flow

    address = dask_address or execution.dask_address
    with api_for_workers(runner, address) as api_ready:  # a Dask run's API server starts meanwhile
        if resume is None:
            # config, budget and input checks run here, before Prefect starts: bad input ends with
            # the same message and exit status as without --flow, and never reaches Prefect's logs
            from pipeline.job.prepare import prepare

            resume = str(prepare(config))
        api_ready()
        return with_runner(runner, address)(config_path="", resume_dir=resume)


ledger_app = typer.Typer(cls=_Group, no_args_is_help=True,
                         help="The privacy-budget ledger: spends per dataset; give back a failed run's ρ.",
                         epilog=_examples("dptab ledger show --config configs/demo.yaml",
                                          "dptab ledger fail runs/<run-id>"))
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("show", cls=_Command, epilog=_examples(
    "dptab ledger show --config configs/demo.yaml     # the config's ledger and dataset",
    "dptab ledger show --ledger runs/ledger.sqlite    # every dataset in a ledger"))
def ledger_show_cmd(
    ledger: str = typer.Option(None, "--ledger", help="ledger file (default: the config's privacy.ledger)"),
    config: str = typer.Option(None, "--config", help="run config YAML naming the ledger and dataset"),
    dataset: str = typer.Option(None, "--dataset", help="only this dataset"),
) -> None:
    """List every spend per dataset: lifetime ρ, spent ρ, and each release's ρ and status."""
    from rich.table import Table

    from pipeline.job.budget import ledger_summary
    from pipeline.model.config import load_config

    try:
        if ledger is None:
            if config is None:
                raise typer.BadParameter("give --ledger or --config")
            cfg = load_config(config)
            ledger, dataset = str(cfg.privacy.ledger), dataset or cfg.dataset_id
        summary = ledger_summary(ledger, dataset)
    except typer.BadParameter:
        raise
    except Exception as exc:
        _fail(exc)
    console = _console()
    for ds in summary:
        t = Table(title=f"{ds['dataset']}: spent {ds['spent_rho']} of lifetime {ds['lifetime_rho']}")
        for col in ("release", "rho", "eps", "status", "created", "updated"):
            t.add_column(col)
        for r in ds["releases"]:
            t.add_row(*(str(r[c]) for c in ("release", "rho", "eps", "status", "created", "updated")))
        console.print(t)
    if not summary:
        console.print("no spends recorded")


@ledger_app.command("fail", cls=_Command, epilog=_examples(
    "dptab ledger fail runs/<run-id>     # the run's noise never left its run directory"))
def ledger_fail_cmd(run_dir: str = typer.Argument(..., help="the run directory whose reservation to give back")) -> None:
    """Mark a run failed so its ρ stops counting — refused if anything derived from its noise
    left the run directory (a release, even a partial one). The run can never resume after."""

    from pipeline.job.budget import fail_run

    try:
        out = fail_run(run_dir)
    except Exception as exc:
        _fail(exc)
    _console().print(f"release {out['release']} of {out['dataset']}: marked failed, rho "
                                  f"{out['rho_released']} no longer counts (spent now {out['spent_now']})")


@_command("validate",
          'dptab validate --persons persons.parquet --units units.parquet',
          'dptab validate --config my-job.yaml --hide-values   # no data values shown')
def validate_cmd(
    persons: str = typer.Option(None, "--persons", help="persons Parquet file or directory of parts"),
    units: str = typer.Option(None, "--units", help="units Parquet file or directory of parts"),
    config: str = typer.Option(None, "--config", help="run config YAML (takes the input paths and spec from it)"),
    hide_values: bool = typer.Option(False, "--hide-values",
                                     help="report problems without data values (row numbers and counts only)"),
) -> None:
    """Validate the persons and units inputs; exit 2 listing every problem if they are invalid."""
    import time

    from pipeline.inputs.problems import InputValidationError
    from pipeline.inputs.validation import validate_inputs
    from pipeline.model.config import ConfigError
    from pipeline.model.spec import SpecError, load_spec

    spec = None
    lookup = None
    if config is not None:
        from pipeline.errors import DptabError
        from pipeline.inputs.lookup import lookup_problems
        from pipeline.job.prepare import check_config

        try:
            # everything about the config that can be checked without data: strategies for the
            # spec and levels, table shells for the spec, budget, output folders
            cfg = check_config(config)
            spec = load_spec(cfg.spec)
        except (ConfigError, SpecError, OSError, DptabError) as exc:
            typer.echo(f"invalid configuration: {exc}", err=True)
            raise typer.Exit(2)
        persons = persons or str(cfg.inputs.persons)
        units = units or str(cfg.inputs.units)
        if cfg.geography.lookup is not None:
            lookup, lproblems = lookup_problems(cfg.geography.lookup, [lv.name for lv in cfg.geography.geolevels()])
            if lproblems:
                typer.echo(InputValidationError(lproblems).message(values=not hide_values), err=True)
                raise typer.Exit(2)
    if persons is None or units is None:
        typer.echo("give --persons FILE and --units FILE, or --config FILE", err=True)
        raise typer.Exit(2)

    t0 = time.perf_counter()
    # a spinner naming the current pass, on stderr and only on a terminal
    with _console(stderr=True).status("validating inputs") as status:
        try:
            inputs = validate_inputs(persons, units, spec, on_step=lambda text: status.update(text), lookup=lookup)
        except InputValidationError as exc:
            status.stop()
            typer.echo(exc.message(values=not hide_values), err=True)
            raise typer.Exit(2)
    typer.echo(f"valid inputs ({time.perf_counter() - t0:.1f} s)")
    typer.echo(f"  persons file: {persons}")
    typer.echo(f"  units file:   {units}")
    for line in inputs.summary.lines():
        typer.echo(f"  {line}")


@_command("synth",
          'dptab synth --persons 100000 --seed 1 --out data/synth',
          'dptab synth --persons 1000000 --seed 2020 --state 44 --out data/ri',
          'dptab synth --spec dhc_p12 --persons 20000 --seed 1 --out data/p12',
          'dptab synth --spec agesex --country rur/areas.csv --persons 6000 --seed 1 \\',
          '  --out rur   # a synthetic country (lookup file), persons by age band x sex')
def synth_cmd(
    persons: int = typer.Option(..., "--persons", help="number of persons to generate"),
    seed: int = typer.Option(..., "--seed", help="random seed (the output is a function of persons, seed, states)"),
    out: str = typer.Option(..., "--out", help="output directory: writes persons.parquet and units.parquet"),
    state: list[str] = typer.Option(None, "--state", help="state FIPS code(s) to fill first, e.g. 44 (repeatable)"),
    batch_persons: int = typer.Option(1_000_000, "--batch-persons", help="persons per written batch (bounds memory)"),
    spec: str = typer.Option(None, "--spec", help="another histogram spec (name or YAML): persons get one column "
                                                  "per attribute, on US blocks or the units of --lookup/--country"),
    lookup: str = typer.Option(None, "--lookup", help="with --spec: place persons in the bottom units of this "
                                                      "geography lookup file (CSV or Parquet)"),
    country: str = typer.Option(None, "--country", help="with --spec: first write a synthetic country lookup "
                                                        "(country > region > district > area) to this CSV, then use it"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Generate a realistic synthetic population (persons and units) in bounded memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.inputs.synth import SynthError, synthesize

    if spec is not None or lookup is not None or country is not None:
        _synth_spec(spec, persons, seed, out, lookup, country)
        return
    console = _console(stderr=True)
    try:
        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=quiet) as bar:
            task = bar.add_task("synth", total=persons)
            s = synthesize(persons, seed, out, states=state or None, batch_persons=batch_persons,
                           progress=lambda done, total: bar.update(task, completed=done))
    except SynthError as exc:
        typer.echo(f"synth: {exc}", err=True)
        raise typer.Exit(2)
    rate = s.persons / s.seconds if s.seconds > 0 else float("inf")
    typer.echo(f"wrote {s.persons_path} ({s.persons:,} persons, {s.gq_persons:,} in group quarters, "
               f"{s.voting_age / max(s.persons, 1):.1%} voting age)")
    typer.echo(f"wrote {s.units_path} ({s.housing_units:,} housing units, {s.occupied:,} occupied, "
               f"{s.facilities:,} GQ facilities)")
    typer.echo(f"geography: {s.states} state(s), {s.counties} counties, {s.tracts:,} tracts, "
               f"{s.block_groups:,} block groups, {s.blocks:,} blocks ({s.populated_blocks:,} populated)")
    typer.echo(f"{s.seconds:.1f} s ({rate:,.0f} persons/s)")


def _synth_spec(spec: str | None, persons: int, seed: int, out: str, lookup: str | None, country: str | None) -> None:
    """``dptab synth --spec``: persons of any spec, on US blocks or the units of a lookup file."""
    from pipeline.errors import DptabError
    from pipeline.inputs.synth_spec import synth_country, synthesize_spec
    from pipeline.model.spec import load_spec

    if spec is None:
        typer.echo("synth: --lookup and --country need --spec (the attributes to draw)", err=True)
        raise typer.Exit(2)
    if lookup is not None and country is not None:
        typer.echo("synth: give --lookup or --country, not both", err=True)
        raise typer.Exit(2)
    try:
        sp = load_spec(spec)
        if country is not None:
            lookup = str(synth_country(country, seed))
            typer.echo(f"wrote {lookup} (a synthetic country: country > region > district > area)")
        pp, up = synthesize_spec(sp, persons, seed, out, lookup)
    except DptabError as exc:
        typer.echo(f"synth: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {pp} ({persons:,} persons, spec {sp.name}: {', '.join(a.name for a in sp.attributes)})")
    typer.echo(f"wrote {up}")


@_command("init",
          'dptab init mydata --levels country,region,district,area',
          'dptab init city --levels city,ward,block --name city2026')
def init_cmd(
    folder: str = typer.Argument(..., help="folder to write the starter files into (created; never overwritten)"),
    levels: str = typer.Option("country,region,district,area", "--levels",
                               help="your geography's level names, top to bottom, comma-separated"),
    name: str = typer.Option("mydata", "--name", help="dataset id and the prefix of the spec and strategy names"),
) -> None:
    """Write a starter spec, tables, strategies, sample lookup and config for your own data."""
    from pipeline.model.starter import StarterError, write_starter

    try:
        paths = write_starter(folder, [x.strip() for x in levels.split(",") if x.strip()], name)
    except StarterError as exc:
        typer.echo(f"init: {exc}", err=True)
        raise typer.Exit(2)
    for p in paths:
        typer.echo(f"wrote {p}")
    typer.echo(f"next: read {paths[-1]}")


@_command("histograms",
          'dptab histograms --persons data/persons.parquet --units data/units.parquet')
def histograms_cmd(
    persons: str = typer.Option(..., "--persons", help="persons Parquet file or directory of parts"),
    units: str = typer.Option(..., "--units", help="units Parquet file or directory of parts"),
    spec: str = typer.Option("pl94", "--spec", help="histogram spec name or YAML path"),
) -> None:
    """Build the true histograms of every level and print per-level unit counts and totals."""
    import time

    from rich.table import Table

    from pipeline.inputs.histograms import build_person_histograms, build_unit_counts
    from pipeline.inputs.problems import InputValidationError
    from pipeline.inputs.readers import read_persons, read_units
    from pipeline.model.geography import Geography, GeographyError
    from pipeline.model.histogram import HistogramError
    from pipeline.model.spec import load_spec

    # wide enough for national counts even when not writing to a terminal (rich defaults to 80)
    console = _console()
    times: dict[str, float] = {}
    try:
        t = time.perf_counter()
        with console.status("reading units, building the geography"):
            u = read_units(units)
            blocks = u.select("geoid").unique().collect(engine="streaming")["geoid"]
            geo = Geography.from_block_geoids(blocks)
        times["geography"] = time.perf_counter() - t
        t = time.perf_counter()
        with console.status("persons histograms (one pass)"):
            hists = build_person_histograms(read_persons(persons), geo, load_spec(spec))
        times["persons histograms"] = time.perf_counter() - t
        t = time.perf_counter()
        with console.status("unit counts"):
            counts = build_unit_counts(u, geo)
        times["unit counts"] = time.perf_counter() - t
    except (InputValidationError, HistogramError, GeographyError) as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2)
    table = Table(title=f"histograms of {persons}")
    for col in ("level", "units", "non-zero cells", "persons", "housing units", "occupied", "GQ facilities"):
        table.add_column(col, justify="left" if col == "level" else "right", no_wrap=True)
    for lv in geo.levels:
        h, c = hists[lv.name], counts[lv.name]
        table.add_row(lv.name, f"{lv.n_units:,}", f"{h.nnz:,}", f"{h.total():,}", f"{int(c.housing_units.sum()):,}",
                      f"{int(c.occupied.sum()):,}", f"{int(c.facilities.sum()):,}")
    console.print(table)
    console.print("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
                  + f", total {sum(times.values()):.2f} s")


@_command("verify",
          'dptab verify releases/<release-id>',
          'dptab verify releases/<release-id> --show 10   # list at most 10 failures')
def verify_cmd(
    release_dir: str = typer.Argument(..., help="a release folder releases/<release-id>/"),
    show: int = typer.Option(50, "--show", help="list at most this many failures"),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=1,
                                help="processes: with 2, a large release's explorer is regenerated and its noisy "
                                     "measurements checked beside its other data files"),
) -> None:
    """Recompute every checksum and consistency check of a release; exit 1 listing failures."""
    import json
    import time
    from pathlib import Path

    from pipeline.release.verify import ReleaseFormatError, verify_release

    t0 = time.perf_counter()
    try:
        failures = verify_release(release_dir, workers=workers)
    except ReleaseFormatError as exc:
        typer.echo(f"not a release: {exc}", err=True)
        raise typer.Exit(2)
    if failures:
        typer.echo(f"{release_dir}: {len(failures)} failure(s)", err=True)
        for f in failures[:show]:
            typer.echo(f"  {f}", err=True)
        if len(failures) > show:
            typer.echo(f"  ... and {len(failures) - show} more", err=True)
        raise typer.Exit(1)
    typer.echo(f"{release_dir}: every checksum and consistency check passes ({time.perf_counter() - t0:.1f} s)")
    from pipeline.release.joint import RULES, release_joint_violations

    v = release_joint_violations(release_dir)
    if v is None:  # tables other than the PL94 shells: the rules do not apply
        return
    n = {r: int(v[r].sum()) for r in RULES}
    joint = (json.loads((Path(release_dir) / "manifest.json").read_text()).get("joint") or {}).get("households")
    typer.echo(f"persons vs housing units ({'held together' if joint else 'independent, as 2020'}): "
               + ", ".join(f"{k.replace('_', ' ')}: {c}" for k, c in n.items()))


@_command("review",
          'dptab review runs/<run-id>',
          'dptab review runs/<run-id> --experiment runs/experiments/<name>')
def review_cmd(
    run_dir: str = typer.Argument(..., help="a finished run directory (runs/<run-id>)"),
    experiment: str = typer.Option(None, "--experiment", help="add this experiment directory's comparison"),
) -> None:
    """Internal review: metrics vs truth and an HTML report under RUN_DIR/review (confidential).

    Prints only the paths written: the truth-based figures stay in the run directory.
    """
    from pipeline.job.progress import StageProgress
    from pipeline.review.runner import review_run_dir

    try:
        with StageProgress(console=_console(stderr=True)) as prog:
            report = review_run_dir(run_dir, experiment=experiment, progress=prog.report)
    except Exception as exc:  # missing files and bad run directories carry exit status 2
        _fail(exc)
    typer.echo(f"metrics: {report.parent / 'metrics.parquet'}")
    typer.echo(f"report:  {report}")


@_command("experiment",
          'dptab experiment my-job.yaml --trials 20 --rho 1 --rho 5',
          'dptab experiment my-job.yaml --trials 5 --strategy uniform --workers 2',
          'dptab experiment my-job.yaml --trials 20 --compare-estimators')
def experiment_cmd(
    config: str = typer.Argument(..., help="run config YAML (its inputs and strategy)"),
    trials: int = typer.Option(..., "--trials", min=1, help="repetitions per setting"),
    rho: list[str] = typer.Option(None, "--rho", help="rescale the strategy to this total rho (repeatable)"),
    strategy: list[str] = typer.Option(None, "--strategy", help="a strategy name or YAML (repeatable)"),
    compare_joint: bool = typer.Option(False, "--compare-joint",
                                       help="persons and units independent (2020) vs joint.households, paired"),
    compare_estimators: bool = typer.Option(False, "--compare-estimators",
                                            help="postprocess.estimator topdown (2020) vs full, on the same noise draws"),
    simulated_margins: int = typer.Option(None, "--simulated-margins", min=2,
                                          help="score simulated margins of error with this many re-runs per trial"),
    workers: int = typer.Option(2, "--workers", min=1, help="parallel worker processes"),
    out: str = typer.Option(None, "--out", help="experiment directory (default runs/experiments/...)"),
    seed: int = typer.Option(20_200_401, "--seed", help="base seed (trial t uses seed + 1 + t)"),
) -> None:
    """Repeat noise + post-processing N times on the same histograms; mean ± sd per metric."""
    from pipeline.job.progress import StageProgress
    from pipeline.review.experiment import run_experiment

    try:
        with StageProgress(console=_console(stderr=True)) as prog:
            exp = run_experiment(config, trials, rhos=rho or None, strategies=strategy or None, compare_joint=compare_joint,
                                 compare_estimators=compare_estimators, margin_trials=simulated_margins,
                                 workers=workers, out_dir=out, seed=seed, progress=prog.report)
    except Exception as exc:
        _fail(exc)
    typer.echo(f"experiment: {exp}")
    typer.echo(f"report:     {exp / 'report.html'}")


@_command("eval-data",
          'dptab eval-data ri2010 --out data/ri2010',
          'dptab eval-data ri2010 --out data/ri2010 --source ri_2010_block.csv')
def eval_data_cmd(
    name: str = typer.Argument(..., help="evaluation set: ri2010"),
    out: str = typer.Option(..., "--out", help="output directory for persons.parquet and units.parquet"),
    source: str = typer.Option(None, "--source", help="ri_2010_block.csv (default: ../shared/data/real/)"),
    seed: int = typer.Option(2010, "--seed", help="seed of the documented assignment rule"),
) -> None:
    """Build a real-data evaluation set (exact 2010 block counts, assigned detail; see ACCURACY.md)."""

    from pipeline.review.evaldata import DEFAULT_SOURCE, write_ri2010

    console = _console()
    if name != "ri2010":
        console.print(f"[red]unknown evaluation set {name!r}[/red]; known: ri2010")
        raise typer.Exit(2)
    try:
        paths = write_ri2010(out, source or DEFAULT_SOURCE, seed=seed)
    except Exception as exc:
        _fail(exc)
    for k, p in paths.items():
        typer.echo(f"{k}: {p}")


@_command("budget",
          'dptab budget census2020_pl94 --delta 1e-10',
          'dptab budget uniform --no-pld      # without the PLD epsilon (faster)',
          'dptab budget census2020_pl94 --respend state:total --write my_strategy.yaml')
def budget_cmd(
    strategy: str = typer.Argument(..., help="strategy YAML file or a name in schemas/strategies/"),
    delta: str = typer.Option("1e-10", "--delta", help="δ for the (ε, δ) figures"),
    pld: bool = typer.Option(True, "--pld/--no-pld", help="also compute the PLD ε (a few seconds)"),
    respend: list[str] = typer.Option(None, "--respend", help="LEVEL:QUERY fixed exactly by an invariant (e.g. "
                                      "state:total with state totals invariant): re-spend its ρ on every other "
                                      "measurement, same total ρ (repeatable)"),
    write: str = typer.Option(None, "--write", help="with --respend: write the derived strategy to this YAML file"),
) -> None:
    """Print the privacy budget of a strategy: level × query → ρ_q, σ, share; total ρ; ε (CKS and PLD)."""
    from fractions import Fraction
    from pathlib import Path

    from rich.table import Table

    from pipeline.model.strategy import StrategyError, budget_rows, load_strategy, respend_invariant_rho, strategy_yaml
    from pipeline.privacy.accounting import cks_epsilon, loose_epsilon

    console = _console()
    try:
        s = load_strategy(strategy)
        d = Fraction(delta)
        if not 0 < d < 1:
            raise StrategyError(f"--delta must be in (0, 1), got {delta}")
        if write and not respend:
            raise StrategyError("--write needs --respend (the strategy file itself is the unchanged strategy)")
        if respend:
            exact: dict[str, tuple[str, ...]] = {}
            for item in respend:
                level, sep, query = item.partition(":")
                if not sep or (level, query) not in s.rho_by_level_query():
                    raise StrategyError(f"--respend {item!r}: not a LEVEL:QUERY measured by {s.name!r}")
                exact[level] = exact.get(level, ()) + (query,)
            name = Path(write).stem if write else None
            s = respend_invariant_rho(s, exact, name=name)
            if write:
                Path(write).write_text(strategy_yaml(s, f"Derived with: dptab budget {strategy} "
                                                        + " ".join(f"--respend {r}" for r in respend)))
                s = load_strategy(write)  # what a run will read
    except (StrategyError, ValueError, ZeroDivisionError, OSError) as exc:
        console.print(f"[red]invalid strategy or delta:[/red] {exc}")
        raise typer.Exit(2)
    table = Table(title=f"{s.name}  (spec {s.spec}, ρ = {s.rho})")
    for col in ("level", "query", "ρ_q", "σ", "share of ρ"):
        table.add_column(col, justify="left" if col in ("level", "query") else "right")
    for r in budget_rows(s):
        table.add_row(r["level"], r["query"], f"{float(r['rho']):.6g}", f"{r['sigma']:.3f}",
                      f"{float(r['share']) * 100:.2f}%")
    console.print(table)
    total = s.total_rho
    console.print(f"total ρ = {total} ≈ {float(total):.6f}", soft_wrap=True)
    eps = float(cks_epsilon(total, d))
    console.print(f"ε (zCDP → (ε, δ), CKS20 Cor. 13) ≤ {eps:.4f} (≈ {eps:.2f}) at δ = {delta}", soft_wrap=True)
    console.print(f"ε (loose bound ρ + 2√(ρ ln 1/δ)) ≤ {float(loose_epsilon(total, d)):.4f}", soft_wrap=True)
    if pld:
        from pipeline.privacy.pld import strategy_pld_epsilon

        e_pld = float(strategy_pld_epsilon(s, d))
        console.print(f"ε (PLD of the composed discrete Gaussians, worst-case neighbour) ≤ {e_pld:.4f} "
                      f"(≈ {e_pld:.2f}) at δ = {delta}", soft_wrap=True)
    console.print("(ε values are rounded up to 1e-4; the ≈ figures are for reading only)", soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
