"""Help that teaches: every ``dptab`` command's ``--help`` has examples, boolean flags show as
flags, ``dptab --version`` prints the version, and ``python -m flows.serve`` documents every option."""

from __future__ import annotations

import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from dptab.cli import app
from pipeline import __version__

COMMANDS = sorted(get_command(app).commands)


def test_every_command_is_covered() -> None:
    assert {"run", "validate", "synth", "histograms", "verify", "review", "experiment", "eval-data",
            "budget"} <= set(COMMANDS)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_examples_and_flags_are_flags(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"] if command else ["--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Example" in res.output
    # the examples are real invocations of this command
    if command:
        assert re.search(rf"^\s+dptab {re.escape(command)}\b", res.output, re.M), res.output
    assert "<bool>" not in res.output, res.output


def test_boolean_flags_take_no_value() -> None:
    res = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    line = next(ln for ln in res.output.splitlines() if "--quiet" in ln)
    assert re.search(r"--quiet\s+no progress bars", line), line
    res = CliRunner().invoke(app, ["budget", "--help"], terminal_width=200)
    line = next(ln for ln in res.output.splitlines() if "--no-pld" in ln)
    assert re.search(r"--no-pld\s+also compute", line), line


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"dptab {__version__}"


def test_serve_options_have_help() -> None:
    from flows.serve import parser

    ap = parser()
    options = [a for a in ap._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} == {"config", "cron", "timezone", "name"}
    for a in options:
        assert a.help and len(a.help) > 15, a.dest
    text = ap.format_help()
    assert "Example" in text and "python -m flows.serve --config" in text
    args = ap.parse_args(["--config", "c.yaml"])
    assert (args.cron, args.timezone, args.name) == ("0 2 * * *", "UTC", "nightly-served")


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_fit_an_80_column_terminal(command: str) -> None:
    """Each example is one unbroken line in a standard terminal, so it can be copied."""
    examples = [ln.strip() for ln in get_command(app).commands[command].epilog.splitlines() if ln.strip().startswith("dptab")]
    assert examples
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=80)
    lines = [ln.strip(" │") for ln in res.output.splitlines()]
    for ex in examples:
        assert ex in lines, (ex, res.output)


@pytest.mark.parametrize("sub", ["show", "fail"])
def test_ledger_subcommands_have_examples(sub: str) -> None:
    res = CliRunner().invoke(app, ["ledger", sub, "--help"], terminal_width=200)
    assert res.exit_code == 0 and re.search(rf"^\s+dptab ledger {sub}\b", res.output, re.M), res.output
