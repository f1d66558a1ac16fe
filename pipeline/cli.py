"""The ``dptab`` command line. Each command is a thin wrapper over library functions.

Exit status: 0 success, 2 invalid input or configuration (nothing later runs), 1 other errors.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Differentially private tabulation.")


@app.command("run")
def run_cmd(
    config: str = typer.Argument(None, help="run config YAML (omit with --resume)"),
    resume: str = typer.Option(None, "--resume", help="continue the run in this run directory"),
    flow: bool = typer.Option(False, "--flow", help="run as a Prefect flow (ephemeral API unless PREFECT_API_URL is set)"),
    task_runner: str = typer.Option("thread", "--task-runner", help="thread or dask (with --flow)"),
    dask_address: str = typer.Option(None, "--dask-address", help="tcp://scheduler:8786 of an existing Dask cluster"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run (or resume) a release job: validate, histograms, noise, top-down, publish."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.config import ConfigError
    from pipeline.run import run_job_for_cli

    if config is None and resume is None:
        raise typer.BadParameter("give a CONFIG or --resume RUN_DIR")
    console = Console()
    try:
        summary = run_job_for_cli(config, resume, flow=flow, task_runner=task_runner,
                                  dask_address=dask_address, progress=not quiet)
    except ConfigError as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2)
    except Exception as exc:  # input and budget errors carry their own exit status
        status = getattr(exc, "exit_status", 1)
        console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
        raise typer.Exit(status)
    table = Table(title="dptab run summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)


@app.command("validate")
def validate_cmd(
    persons: str = typer.Option(None, "--persons", help="persons Parquet file or directory of parts"),
    units: str = typer.Option(None, "--units", help="units Parquet file or directory of parts"),
    config: str = typer.Option(None, "--config", help="run config YAML (takes the input paths and spec from it)"),
) -> None:
    """Validate the persons and units inputs; exit 2 listing every problem if they are invalid."""
    import time

    from pipeline.config import ConfigError, load_config
    from pipeline.io import InputValidationError, validate_inputs
    from pipeline.spec import load_spec

    spec = None
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            typer.echo(f"invalid configuration: {exc}", err=True)
            raise typer.Exit(2)
        persons = persons or str(cfg.inputs.persons)
        units = units or str(cfg.inputs.units)
        spec = load_spec(cfg.spec)
    if persons is None or units is None:
        typer.echo("give --persons FILE and --units FILE, or --config FILE", err=True)
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        inputs = validate_inputs(persons, units, spec)
    except InputValidationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    typer.echo(f"valid inputs ({time.perf_counter() - t0:.1f} s)")
    typer.echo(f"  persons file: {persons}")
    typer.echo(f"  units file:   {units}")
    for line in inputs.summary.lines():
        typer.echo(f"  {line}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
