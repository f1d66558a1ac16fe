"""What every stage of a run needs, rebuilt from the run directory (no hidden process state)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from pipeline.files import sha256_file
from pipeline.inputs.invariants import LevelInvariants, read_invariants
from pipeline.job.rundir import RunDir, RunDirError
from pipeline.model.config import RunConfig, load_config
from pipeline.model.geography import Geography
from pipeline.model.schemas import schema_path
from pipeline.model.spec import HistogramSpec, load_spec
from pipeline.model.strategy import Strategy, load_strategy, strategy_path
from pipeline.privacy import randomness

T = TypeVar("T")


#: objects built from a run's verified files, kept per process: (what, sha256 of the file) ->
#: object, least recently used last. Every shard rebuilds its RunContext from the run directory;
#: without this each shard re-read the whole geography and a level's invariants (work that grows
#: with the country, paid per shard: quadratic over a national run). Keyed by content, so a
#: changed file is never served from here; bounded, so a process running many runs stays small.
_BUILT: OrderedDict[tuple[str, str], Any] = OrderedDict()
_BUILT_MAX = 16
_BUILT_LOCK = threading.Lock()  # stages run on threads too (Prefect's thread runner, the shard window)
_BUILDING: dict[tuple[str, str], threading.Lock] = {}  # the objects being built, one lock each


def _built(what: str, sha256: str, build: Callable[[], T]) -> T:
    key = (what, sha256)
    with _BUILT_LOCK:
        if key in _BUILT:
            _BUILT.move_to_end(key)
            return _BUILT[key]  # type: ignore[no-any-return]
        building = _BUILDING.setdefault(key, threading.Lock())
    # one build per key at a time, outside the common lock: the shards a level starts together
    # on threads each asked for the same object at once and each built a copy (at a national
    # block level's start, three copies of its invariants: a 1.2 GB spike at 100 M persons)
    with building:
        with _BUILT_LOCK:
            if key in _BUILT:
                _BUILT.move_to_end(key)
                return _BUILT[key]  # type: ignore[no-any-return]
        try:
            obj = build()
        except BaseException:
            with _BUILT_LOCK:
                _BUILDING.pop(key, None)
            raise
        with _BUILT_LOCK:  # kept and no longer being built in one step: nobody builds it again
            _BUILT[key] = obj
            _BUILDING.pop(key, None)
            while len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
    return obj


@dataclass
class RunContext:
    """A run directory and its config, with the derived objects each stage reads."""

    rd: RunDir
    cfg: RunConfig

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunContext":
        """Open a run directory; refuse it if its config, or a strategy, spec or geolevels file
        it names, changed since the run started (the ledger holds the ρ of the originals, and
        the noise already drawn was drawn for them). Where the work runs (workers, executor,
        Dask address) may change."""
        rd = RunDir.open(Path(run_dir))
        st = rd.state()
        if "config_fingerprint" not in st or "definitions" not in st:
            raise RunDirError(f"{rd.root}: the run directory has no config fingerprint (made by an older dptab, or "
                              "damaged); it cannot be resumed safely — start a new run")
        cfg = load_config(rd.config_path)
        if cfg.run_fingerprint() != st["config_fingerprint"]:
            raise RunDirError(f"{rd.config_path} was edited after the run started (the ledger holds the ρ of "
                              "the original config); restore it, or start a new run with a new release id")
        now = definition_fingerprints(cfg)
        changed = sorted(k for k in set(now) | set(st["definitions"]) if now.get(k) != st["definitions"].get(k))
        if changed:
            raise RunDirError(f"{rd.root}: {', '.join(changed)} changed since the run started; restore "
                              f"{'it' if len(changed) == 1 else 'them'}, or start a new run with a new release id")
        return cls(rd, cfg)

    @cached_property
    def state(self) -> dict[str, object]:
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
    def strategies(self) -> dict[str, Strategy]:
        """The strategy of every run kind of this run: ``{kind: Strategy}`` in run order."""
        return configured_strategies(self.cfg)

    @property
    def kinds(self) -> list[str]:
        """Run kinds in the order they run: units first when persons are constrained by them."""
        kinds = list(self.strategies)
        return sorted(kinds, key=lambda k: k != "units") if self.cfg.joint.households else kinds

    @cached_property
    def geography(self) -> Geography:
        levels = self.cfg.geography.geolevels()
        path = self.rd.geography_path
        sha = self.rd.verified_sha256(path)

        def build() -> Geography:
            if self.cfg.geography.lookup is not None:  # the checked lookup table the run copied
                return Geography.from_lookup(pl.read_parquet(path), levels)
            return Geography.from_block_geoids(pl.read_parquet(path)["geoid"].to_numpy(), levels)

        return _built(f"geography {levels!r} lookup={self.cfg.geography.lookup is not None}", sha, build)

    @cached_property
    def contract(self) -> dict:
        """The run's input contract (:func:`pipeline.inputs.contract.contract_for`)."""
        from pipeline.inputs.contract import contract_for

        return contract_for(self.persons_spec, lookup=self.cfg.geography.lookup is not None)

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.geography.levels]

    def invariants(self, level: str, units: tuple[int, int] | None = None) -> LevelInvariants:
        """The declared public invariants of one level (``invariants/<level>.parquet``), or with
        ``units=(start, stop)`` of those units only, read from the file's row groups that hold
        them and not kept (a shard needs its own; the whole national block level would be ~0.5 GB
        of facilities in every process that solves a shard of it)."""
        path = self.rd.invariants_path(level)
        if units is not None:
            return read_invariants(level, self.rd.verified(path), units=units)
        cache = self.__dict__.setdefault("_invariants", {})
        if level not in cache:
            cache[level] = _built(f"invariants {level}", self.rd.verified_sha256(path),
                                  lambda: read_invariants(level, path))
        return cache[level]

    def source(self, kind: str, level: str, shard: int) -> randomness.RandomSource:
        """The randomness source of one shard: keyed by the release key, or seeded for tests."""
        mode = self.cfg.privacy.randomness
        if mode == "seeded":
            assert self.cfg.privacy.seed is not None  # the config validator guarantees it
            return randomness.seeded_source_for(self.cfg.privacy.seed, kind, level, shard)
        if mode == "keyed":
            return randomness.keyed_source(randomness.load_key(self.rd.key_path), kind, level, str(shard))
        return randomness.secure_source()


def definition_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """``{what: sha256}`` of every definition file a run's spend and outputs depend on beyond
    its config: the strategies, the specs and the geolevels (or geography lookup) it names."""
    files = {"persons strategy " + str(strategy_path(cfg.privacy.strategy)): strategy_path(cfg.privacy.strategy),
             "persons spec " + str(schema_path(cfg.spec)): schema_path(cfg.spec),
             "units spec " + str(schema_path("units")): schema_path("units")}
    if cfg.geography.lookup is not None:
        files["geography lookup " + str(cfg.geography.lookup)] = cfg.geography.lookup
    else:
        lv = str(cfg.geography.levels)
        files["geolevels " + str(schema_path(lv))] = schema_path(lv)
    if cfg.privacy.units_strategy:
        u = strategy_path(cfg.privacy.units_strategy)
        files["units strategy " + str(u)] = u
    return {k: sha256_file(v) if v.is_file() else "missing" for k, v in files.items()}


def configured_strategies(cfg: RunConfig) -> dict[str, Strategy]:
    """``{kind: Strategy}`` for the run kinds a config names (persons always, units if set)."""
    out = {"persons": load_strategy(cfg.privacy.strategy)}
    if cfg.privacy.units_strategy:
        out["units"] = load_strategy(cfg.privacy.units_strategy)
    return out


def total_rho(strategies: dict[str, Strategy]) -> Fraction:
    """The run's total ρ: zCDP composes by addition over the run kinds."""
    return sum((s.total_rho for s in strategies.values()), Fraction(0))
