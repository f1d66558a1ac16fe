"""The bad-input corpus through `dptab run`: every kind ends with exit 2, one clear message that
names the file (and column and rows where there are any), no ledger reservation and no run
directory — nothing reserved, nothing drawn, nothing half made.

Data kinds are the validation cases of ``tests/test_validation_inputs.py`` (52 kinds of broken
persons/units files); the config kinds below add what can be wrong around them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from io_cases import persons_df, units_df, write
from run_helpers import write_config
from test_validation_inputs import CASES, _resolve
from typer.testing import CliRunner

from dptab.cli import app
from pipeline.privacy.ledger import Ledger


def _valid_inputs(tmp: Path) -> Path:
    d = tmp / "inputs"
    d.mkdir(exist_ok=True)
    write(persons_df(), d / "persons.parquet")
    write(units_df(), d / "units.parquet")
    return d


def _run(cfg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["run", "--quiet", str(cfg)])
    return r.exit_code, r.output


def _nothing_left(tmp: Path) -> None:
    ledger = tmp / "ledger.sqlite"
    assert not ledger.exists() or Ledger(ledger).entries() == [], "a reservation was made"
    runs = tmp / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"a run directory was left: {list(runs.iterdir())}"
    releases = tmp / "releases"
    assert not releases.exists() or not any(releases.iterdir())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_is_refused_before_any_reservation(tmp_path: Path, name: str) -> None:
    (tmp_path / "data").mkdir()
    p, u, expected = CASES[name](tmp_path / "data")
    cfg = write_config(tmp_path, tmp_path, inputs={"persons": str(p), "units": str(u)})
    code, out = _run(cfg)
    assert code == 2, out
    assert "Traceback" not in out
    for file, column, kind in _resolve(expected, p, u):
        assert file in out and kind in out, f"{file} / {kind} not named in:\n{out}"
        if column:
            assert f"column '{column}'" in out
    _nothing_left(tmp_path)


def _cfg(tmp: Path, **over) -> Path:
    return write_config(tmp, _valid_inputs(tmp), **over)


def _raw(tmp: Path, text: str) -> Path:
    p = tmp / "config.yaml"
    p.write_text(text)
    return p


def _edit(tmp: Path, fn: Callable[[dict], None]) -> Path:
    p = _cfg(tmp)
    c = yaml.safe_load(p.read_text())
    fn(c)
    p.write_text(yaml.safe_dump(c))
    return p


def _blocked(tmp: Path, key: str) -> Path:
    f = tmp / "blocker"
    f.write_text("a file, not a directory")
    if key == "ledger":
        return _cfg(tmp, privacy={"ledger": str(f / "ledger.sqlite")})
    return _cfg(tmp, output={key: str(f / key)})


def _fifo(tmp: Path) -> Path:
    d = _valid_inputs(tmp)
    os.mkfifo(tmp / "pipe.parquet")
    return write_config(tmp, d, inputs={"persons": str(tmp / "pipe.parquet"), "units": str(d / "units.parquet")})


def _strategy(tmp: Path, body: str, name: str = "mine") -> Path:
    s = tmp / f"{name}.yaml"
    s.write_text(body)
    return _cfg(tmp, privacy={"strategy": str(s)})


def _geolevels_without_tract(tmp: Path) -> Path:
    g = tmp / "levels.yaml"
    g.write_text("levels:\n  - {name: nation, digits: 0}\n  - {name: state, digits: 2}\n"
                 "  - {name: county, digits: 5}\n  - {name: block, digits: 15}\n")
    return _cfg(tmp, geography={"levels": str(g)})


#: name -> (make config, text the message must contain)
CONFIG_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "config_missing": (lambda t: t / "nope.yaml", "config file not found"),
    "config_not_yaml": (lambda t: _raw(t, "dataset_id: [unclosed"), "not valid YAML"),
    "config_not_a_mapping": (lambda t: _raw(t, "- a\n- b\n"), "expected a mapping"),
    "config_unknown_key": (lambda t: _edit(t, lambda c: c.update(colour="blue")), "colour"),
    "config_bad_dataset_id": (lambda t: _edit(t, lambda c: c.update(dataset_id="../escape")), "dataset_id"),
    "config_bad_release_id": (lambda t: _edit(t, lambda c: c.update(release_id="a/b")), "release_id"),
    "lifetime_rho_absurd": (lambda t: _cfg(t, privacy={"lifetime_rho": "1e2000000"}), "lifetime_rho"),
    "lifetime_rho_not_a_number": (lambda t: _cfg(t, privacy={"lifetime_rho": "lots"}), "lifetime_rho"),
    "lifetime_rho_negative": (lambda t: _cfg(t, privacy={"lifetime_rho": "-1"}), "lifetime_rho"),
    "seed_without_seeded": (lambda t: _cfg(t, privacy={"randomness": "keyed", "seed": 3}), "seed"),
    "delta_out_of_range": (lambda t: _cfg(t, privacy={"delta": 2}), "delta"),
    "workers_zero": (lambda t: _cfg(t, execution={"workers": 0}), "workers"),
    "strategy_unknown": (lambda t: _cfg(t, privacy={"strategy": "no_such_strategy"}), "no_such_strategy"),
    "strategy_for_other_spec": (lambda t: _cfg(t, privacy={"strategy": "census2020_units"}), "spec"),
    "strategy_float_share": (lambda t: _strategy(t, "name: s\nspec: pl94\nrho: 1\nlevels:\n  nation: {share: 1.0, "
                                                    "queries: {total: 1}}\n"), "exact"),
    "strategy_shares_not_one": (lambda t: _strategy(t, "name: s\nspec: pl94\nrho: 1\nlevels:\n  nation: {share: 1/2, "
                                                       "queries: {total: 1}}\n"), "sum to"),
    "strategy_unknown_query": (lambda t: _strategy(t, "name: s\nspec: pl94\nrho: 1\nlevels:\n  nation: {share: 1, "
                                                      "queries: {colour: 1}}\n"), "colour"),
    "strategy_level_not_in_geography": (_geolevels_without_tract, "does not have"),
    "spec_unknown": (lambda t: _cfg(t, spec="no_such_spec"), "no_such_spec"),
    "geolevels_missing": (lambda t: _cfg(t, geography={"levels": str(t / "none.yaml")}), "geolevels file not found"),
    "runs_dir_blocked": (lambda t: _blocked(t, "runs_dir"), "output.runs_dir"),
    "releases_dir_blocked": (lambda t: _blocked(t, "releases_dir"), "output.releases_dir"),
    "ledger_dir_blocked": (lambda t: _blocked(t, "ledger"), "privacy.ledger"),
    "persons_missing": (lambda t: write_config(t, _valid_inputs(t), inputs={
        "persons": str(t / "absent.parquet"), "units": str(t / "inputs" / "units.parquet")}), "absent.parquet"),
    "persons_fifo": (_fifo, "not a regular file"),
    "ledger_is_a_directory": (lambda t: _cfg(t, privacy={"ledger": str((t / "ledger-dir").resolve())})
                              if (t / "ledger-dir").mkdir() is None else None, "not a usable privacy ledger"),
    "dask_scheduler_unreachable": (lambda t: _cfg(t, execution={"executor": "dask",
                                                                "dask_address": "tcp://127.0.0.1:9"}),
                                   "no Dask scheduler answers"),
    "dask_without_address": (lambda t: _cfg(t, execution={"executor": "dask"}), "dask_address"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_is_refused_before_any_reservation(tmp_path: Path, name: str) -> None:
    make, text = CONFIG_CASES[name]
    cfg = make(tmp_path)
    code, out = _run(cfg)
    assert code == 2, out
    assert "Traceback" not in out
    assert text in out, out
    # the message names the file at fault: the config, or the file it points to
    assert str(tmp_path) in out or "no_such" in out, f"the message does not name the file:\n{out}"
    _nothing_left(tmp_path)


def test_the_corpus_has_at_least_sixty_kinds() -> None:
    assert len(CASES) + len(CONFIG_CASES) >= 60


def test_flow_run_on_bad_input_gives_the_same_message_and_status(tmp_path: Path) -> None:
    """`dptab run --flow` checks config and inputs before Prefect starts: exit 2, same text."""
    (tmp_path / "data").mkdir()
    p, u, _ = CASES["wrong_type_float_attribute"](tmp_path / "data")
    cfg = write_config(tmp_path, tmp_path, inputs={"persons": str(p), "units": str(u)})
    plain = CliRunner().invoke(app, ["run", "--quiet", str(cfg)])
    flow = CliRunner().invoke(app, ["run", "--quiet", "--flow", str(cfg)])
    assert plain.exit_code == flow.exit_code == 2
    assert flow.output == plain.output and "Traceback" not in flow.output
    _nothing_left(tmp_path)
