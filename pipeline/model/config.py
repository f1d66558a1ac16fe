"""Run configuration: one YAML file per release job, validated with pydantic.

Paths in the file are resolved relative to the file's directory. The config never holds a
secret: the noise key lives only in the run directory (mode 0600). A ``seed`` is allowed only
together with ``randomness: seeded`` (tests and experiments) and is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ConfigurationError
from pipeline.model.geography import GeoLevel, load_geolevels, lookup_levels
from pipeline.model.schemas import load_yaml, relative_to


class ConfigError(ConfigurationError):
    """The run configuration is invalid (maps to CLI exit status 2)."""


class InputsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persons: Path
    units: Path


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str = "census2020_pl94"
    units_strategy: str | None = "census2020_units"
    delta: float = Field(1e-10, gt=0, lt=1)
    lifetime_rho: str = Field("10", description="dataset's declared lifetime zCDP budget, exact fraction text")
    ledger: Path = Path("runs/ledger.sqlite")
    randomness: Literal["secure", "keyed", "seeded"] = "keyed"
    seed: int | None = None
    full_measurements: bool = False

    @field_validator("lifetime_rho")
    @classmethod
    def _positive_fraction(cls, v: str) -> str:
        try:
            f = Fraction(v)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"lifetime_rho must be an exact fraction like '10' or '293764/114921': {exc}")
        if f <= 0:
            raise ValueError("lifetime_rho must be > 0")
        return v

    @model_validator(mode="after")
    def _seed_only_when_seeded(self) -> "PrivacyConfig":
        if self.randomness == "seeded" and self.seed is None:
            raise ValueError("randomness: seeded needs a seed")
        if self.randomness != "seeded" and self.seed is not None:
            raise ValueError("a seed is only allowed with randomness: seeded (tests and experiments)")
        return self


class GeographyConfig(BaseModel):
    """The hierarchy: US digit prefixes (``levels``: a geolevels YAML) or, with ``lookup``, a
    lookup file naming every bottom unit's code at each level (``levels``: the level names, top
    to bottom, which are the file's columns)."""

    model_config = ConfigDict(extra="forbid")
    levels: str | list[str] = Field("geolevels", description="geolevels YAML: a name in schemas/ or a path (top to "
                                                             "bottom); with lookup: the level names, top to bottom")
    blocks: Path | None = Field(None, description="public list of every block (Parquet or CSV, column geoid); "
                                                  "default: the blocks of the units file")
    lookup: Path | None = Field(None, description="public lookup file (Parquet or CSV): one row per bottom unit, "
                                                  "one text column per level naming its code there")

    @model_validator(mode="after")
    def _lookup_names_levels(self) -> "GeographyConfig":
        if self.lookup is not None:
            if not isinstance(self.levels, list):
                raise ValueError("geography.lookup needs geography.levels: the list of level names, top to bottom "
                                 "(the lookup file's columns)")
            if self.blocks is not None:
                raise ValueError("geography.blocks and geography.lookup exclude each other (the lookup lists every unit)")
            if len(self.levels) < 2 or len(set(self.levels)) != len(self.levels):
                raise ValueError(f"geography.levels must name at least two distinct levels, got {self.levels}")
        elif isinstance(self.levels, list):
            raise ValueError("geography.levels as a list of names needs geography.lookup (the file naming each "
                             "unit's code at every level)")
        return self

    def geolevels(self) -> tuple[GeoLevel, ...]:
        """The levels, top to bottom (GeographyError if a geolevels file is bad)."""
        if isinstance(self.levels, list):
            return lookup_levels(self.levels)
        return load_geolevels(self.levels)


class InvariantsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_totals: bool = True
    block_housing_units: bool = True
    gq_facilities: bool = True


class JointConfig(BaseModel):
    """Persons and housing units that agree with each other, at every level (off = 2020)."""

    model_config = ConfigDict(extra="forbid")
    households: bool = Field(False, description="solve units first; then persons in households >= occupied "
                                                "units, and = 0 where there are none")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runs_dir: Path = Path("runs")
    releases_dir: Path = Path("releases")
    publish_measurements: bool = True
    csv: bool = Field(True, description="also write csv/<geolevel>/<table>.csv (large at block level)")
    margins: Literal["design", "simulated"] = Field(
        "design", description="moe90 from the noise design alone (one per line and level; per unit with the full "
                              "estimator), or simulated: margin_trials re-runs of the post-processing on fresh noise "
                              "around the published counts (approximate Monte Carlo; per cell; no budget)")
    margin_trials: int = Field(10, ge=2, le=1000, description="re-runs of the post-processing for simulated margins")


class PostprocessConfig(BaseModel):
    """How the published counts are estimated from the noisy measurements."""

    model_config = ConfigDict(extra="forbid")
    estimator: Literal["topdown", "full"] = Field(
        "full", description="topdown: each level from its own measurements and its parent's answer (2020 "
                               "TopDown); full: the hierarchical least-squares (BLUE) estimate from every "
                               "level's measurements, then the same constrained top-down engine")


class ExecutionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, ge=1, le=256)
    executor: Literal["local", "dask"] = Field("local", description="where shards run without Prefect: this "
                                              "machine's worker pool, or the Dask cluster at dask_address")
    task_runner: Literal["thread", "dask"] = Field("thread", description="Prefect task runner (dptab run --flow)")
    dask_address: str | None = Field(None, description="tcp://scheduler:8786 of an existing Dask cluster")
    shard_target_cells: int = Field(5_000_000, ge=1, description="cells (children x free cells) per shard")


def _dask_needs_address(e: "ExecutionConfig") -> None:
    if e.executor == "dask" and not e.dask_address:
        raise ValueError("execution.executor: dask needs execution.dask_address (tcp://scheduler:8786)")


class RunConfig(BaseModel):
    """A release job: inputs, privacy, invariants, outputs and execution settings."""

    model_config = ConfigDict(extra="forbid")
    dataset_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    release_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    title: str = "dptab release"
    confidential: bool = True
    spec: str = "pl94"
    tables: str = Field("pl94", description="table shells: a name in schemas/tables/ or a YAML path; their "
                                            "persons_spec must be the run's spec")
    inputs: InputsConfig
    geography: GeographyConfig = GeographyConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    invariants: InvariantsConfig = InvariantsConfig()
    joint: JointConfig = JointConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    output: OutputConfig = OutputConfig()
    execution: ExecutionConfig = ExecutionConfig()
    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _execution_is_complete(self) -> "RunConfig":
        _dask_needs_address(self.execution)
        return self

    @model_validator(mode="after")
    def _block_list_when_unit_counts_are_private(self) -> "RunConfig":
        # without a public block list the geography is the set of blocks that have a housing
        # unit or a facility, which every release shows (a facility-only block shows up with 0
        # housing units, a housing-only block without facilities); that is public only when both
        # the housing-unit and the facility invariants are declared
        inv = self.invariants
        if self.geography.blocks is None and self.geography.lookup is None and not (inv.block_housing_units and inv.gq_facilities):
            raise ValueError("unless invariants.block_housing_units and invariants.gq_facilities are both on, give "
                             "geography.blocks (a public list of every block): otherwise the release would show "
                             "which blocks have a housing unit or a facility")
        return self

    @model_validator(mode="after")
    def _joint_needs_units(self) -> "RunConfig":
        if self.joint.households and not self.privacy.units_strategy:
            raise ValueError("joint.households needs the units run (privacy.units_strategy)")
        return self

    @property
    def measures_every_answer(self) -> bool:
        """Every answer is drawn (no skipping of answers whose parent answer is 0): asked for, or
        needed by the full estimator, which uses every level's measurements at once."""
        return self.privacy.full_measurements or self.postprocess.estimator == "full"

    def run_fingerprint(self) -> str:
        """sha256 of everything in the config that decides what a run spends, draws and
        publishes — all of it except where the work runs (``execution.workers``, ``executor``,
        ``task_runner``, ``dask_address``), which a resume may change."""
        data = self.model_dump(mode="json")
        for key in ("workers", "executor", "task_runner", "dask_address"):
            data["execution"].pop(key, None)
        canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the config (paths as given, source path excluded)."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def load_config(path: str | Path) -> RunConfig:
    """Load, validate and resolve a run config YAML. Raises :class:`ConfigError`."""
    path = Path(path)
    raw = load_yaml(path, ConfigError, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = RunConfig.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: list every problem in one message
        raise ConfigError(f"{path}: invalid run config:\n{exc}") from None
    base = path.resolve().parent
    cfg.inputs.persons = _resolve(base, cfg.inputs.persons)
    cfg.inputs.units = _resolve(base, cfg.inputs.units)
    cfg.privacy.ledger = _resolve(base, cfg.privacy.ledger)
    cfg.output.runs_dir = _resolve(base, cfg.output.runs_dir)
    cfg.output.releases_dir = _resolve(base, cfg.output.releases_dir)
    if cfg.geography.blocks is not None:
        cfg.geography.blocks = _resolve(base, cfg.geography.blocks)
    if cfg.geography.lookup is not None:
        cfg.geography.lookup = _resolve(base, cfg.geography.lookup)
    # definition files named by a relative .yaml path sit beside the config (names: schemas/)
    cfg.spec = relative_to(cfg.spec, base)
    cfg.tables = relative_to(cfg.tables, base)
    cfg.privacy.strategy = relative_to(cfg.privacy.strategy, base)
    if cfg.privacy.units_strategy:
        cfg.privacy.units_strategy = relative_to(cfg.privacy.units_strategy, base)
    cfg.source_path = path.resolve()
    return cfg
