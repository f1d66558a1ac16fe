"""Preparing a run: every check that can be made before any data is read or any budget is
spent, the reservation, and reopening a run to resume it.

Order of a new run (:func:`prepare`): config, strategies (spec and geography must fit), output
paths, the Dask scheduler if named; the ledger refuses an overspend before any data is read; the
inputs are validated completely; the run directory is made (mode 0700; ``config.yaml`` first,
then ``state.json`` born with every fingerprint a resume checks); the noise key; the atomic
reservation. Any failure before the reservation leaves no reservation and no run directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from fractions import Fraction
from pathlib import Path

import yaml

from pipeline import __version__
from pipeline.errors import RefusedError
from pipeline.files import crash_point, private_files, write_text_atomic
from pipeline.inputs.lookup import read_lookup
from pipeline.inputs.readers import input_fingerprint, read_block_list
from pipeline.inputs.validation import validate_inputs
from pipeline.job.context import RunContext, configured_strategies, definition_fingerprints, total_rho
from pipeline.job.rundir import RunDir, RunDirError, new_run_id
from pipeline.model.config import ConfigError, RunConfig, load_config
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
    lookup = None
    if cfg.geography.lookup is not None:
        lookup = read_lookup(cfg.geography.lookup, [lv.name for lv in cfg.geography.geolevels()])
    valid = validate_inputs(cfg.inputs.persons, cfg.inputs.units, load_spec(cfg.spec), lookup=lookup)
    if cfg.geography.blocks is not None:
        read_block_list(cfg.geography.blocks, valid.units, cfg.geography.geolevels()[-1].digits)
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
    check_rho(ctx)
    ledger = Ledger.open_existing(ctx.cfg.privacy.ledger, st.get("ledger_id"))  # type: ignore[arg-type]
    ledger.check_and_reserve(ctx.cfg.dataset_id, str(st["release_id"]), Fraction(str(st["rho"])),
                             Fraction(ctx.cfg.privacy.lifetime_rho), run=st.get("run_token"))  # type: ignore[arg-type]


def check_rho(ctx: RunContext) -> None:
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
    levels = [lv.name for lv in cfg.geography.geolevels()]
    for kind, s in strategies.items():
        want_spec = cfg.spec if kind == "persons" else "units"
        if load_spec(s.spec_path or s.spec).name != load_spec(want_spec).name:
            raise ConfigError(f"{cfg.source_path}: the {kind} strategy {s.name!r} is for spec {s.spec!r}, "
                              f"but the run's {kind} spec is {want_spec!r}")
        missing = [lv for lv in s.level_names if lv not in levels]
        if missing:
            raise ConfigError(f"{cfg.source_path}: the {kind} strategy {s.name!r} measures levels {missing} "
                              f"that the geography {cfg.geography.levels!r} does not have ({', '.join(levels)})")
    _check_tables_fit(cfg)


def _check_tables_fit(cfg: RunConfig) -> None:
    """The table shells are for the run's spec, and a spec without a ``bound`` role (households and
    group-quarters types) is not run with ``joint.households``."""
    from pipeline.release.tables import TableError, load_tables

    spec = load_spec(cfg.spec)
    try:
        ts = load_tables(cfg.tables)
    except (TableError, OSError) as exc:
        raise ConfigError(f"{cfg.source_path}: tables {cfg.tables!r}: {exc}") from None
    if ts.specs["persons"].name != spec.name:
        raise ConfigError(f"{cfg.source_path}: the tables {cfg.tables!r} are for spec {ts.specs['persons'].name!r}, "
                          f"but the run's spec is {spec.name!r}")
    if cfg.joint.households and not spec.has_role("bound"):
        raise ConfigError(f"{cfg.source_path}: joint.households needs a spec with a bound role (the household / "
                          f"group-quarters query); spec {spec.name!r} declares roles {spec.roles}")


def _resolved_config_text(cfg: RunConfig, release_id: str) -> str:
    """The config as run (paths resolved, the release id filled in), as YAML text."""
    data = cfg.model_dump(mode="json", exclude={"source_path"})
    data["release_id"] = release_id
    return yaml.safe_dump(data, sort_keys=False)


