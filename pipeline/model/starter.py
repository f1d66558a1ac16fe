"""``dptab init``: a starter folder for a user's own data (any hierarchy, any attributes).

Writes a spec (``spec.yaml``: an age band x sex example to edit), table shells
(``tables.yaml``), persons and dwellings strategies for the given levels, a sample geography
lookup (``areas.csv``), a run config (``config.yaml``; every definition file named by a path
relative to it) and ``NEXT_STEPS.md``. Nothing here is US-specific; the files are the example of
``configs/ruritania.yaml`` with the user's level names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from pipeline.errors import ConfigurationError
from pipeline.model.schemas import SCHEMAS_DIR

FILES = ("spec.yaml", "tables.yaml", "strategy.yaml", "units_strategy.yaml", "areas.csv", "config.yaml",
         "NEXT_STEPS.md")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class StarterError(ConfigurationError):
    """The starter folder cannot be written as asked (existing files, bad names)."""


def _shares(n: int) -> list[str]:
    """``n`` exact level shares summing to 1, growing towards the bottom (1, 2, ..., n) / T."""
    total = n * (n + 1) // 2
    return [f"{k}/{total}" for k in range(1, n + 1)]


def _strategy(name: str, spec: str, levels: Sequence[str], rho: str, queries: str, what: str) -> str:
    lines = [f"# {what} for the levels {' > '.join(levels)} (rho = {rho}); level and query shares are exact",
             "# fractions summing to 1 (see `dptab budget strategy.yaml` for the noise per level and query).",
             f"name: {name}", f"description: {what}", f"spec: {spec}",
             f"geolevels: [{', '.join(levels)}]", f'rho: "{rho}"', "levels:"]
    lines += [f"  {lv}: {{share: {s}, queries: {{{queries}}}}}" for lv, s in zip(levels, _shares(len(levels)))]
    return "\n".join(lines) + "\n"


def _areas(levels: Sequence[str]) -> str:
    """A sample lookup: one top unit, two children per unit at every level below."""
    rows: list[list[str]] = [["X"]]
    for _ in range(1, len(levels) - 1):
        rows = [r + [f"{r[-1]}{k}"] for r in rows for k in (1, 2)]
    rows = [r + [f"U{2 * i + k:04d}"] for i, r in enumerate(rows) for k in (1, 2)]
    return ",".join(levels) + "\n" + "\n".join(",".join(r) for r in rows) + "\n"


def write_starter(out: str | Path, levels: Sequence[str], name: str = "mydata") -> list[Path]:
    """Write the starter files into ``out`` (created; existing files are never overwritten)."""
    levels = [str(lv) for lv in levels]
    if len(levels) < 2 or len(set(levels)) != len(levels) or not all(_NAME.match(lv) for lv in levels):
        raise StarterError(f"--levels needs at least two distinct names (letters, digits, _), top to bottom; got {levels}")
    if not _NAME.match(name):
        raise StarterError(f"--name {name!r}: letters, digits and _ only")
    d = Path(out)
    clash = [f for f in FILES if (d / f).exists()]
    if clash:
        raise StarterError(f"{d}: {', '.join(clash)} already exist; choose an empty folder")
    d.mkdir(parents=True, exist_ok=True)
    spec = (SCHEMAS_DIR / "agesex.yaml").read_text().replace("name: agesex", f"name: {name}_persons", 1)
    tables = ((SCHEMAS_DIR / "tables" / "agesex.yaml").read_text()
              .replace("name: agesex", f"name: {name}", 1).replace("persons_spec: agesex", "persons_spec: spec.yaml", 1))
    config = f"""# A run of your own data: every key is validated by pipeline/model/config.py. Paths are relative
# to this file. Try it on synthetic inputs first:
#   dptab synth --spec spec.yaml --lookup areas.csv --persons 5000 --seed 1 --out data
#   dptab validate --config config.yaml && dptab run config.yaml
dataset_id: {name}
title: "{name}: population by age band and sex"
confidential: true                # the review report stays in the run directory
spec: spec.yaml                   # attributes, codes, labels, recodes, queries, roles
tables: tables.yaml               # the published table shells
inputs:
  persons: data/persons.parquet   # geoid (a bottom unit's code) + one integer column per spec attribute
  units: data/units.parquet       # dwellings: unit_id, geoid, kind (0), occupied
geography:
  lookup: areas.csv               # one row per bottom unit: its code at every level
  levels: [{', '.join(levels)}]
privacy:
  strategy: strategy.yaml
  units_strategy: units_strategy.yaml
  lifetime_rho: "10"              # the dataset's lifetime budget (zCDP rho), across all its releases
  ledger: runs/ledger.sqlite
invariants:
  state_totals: true              # the top level's total population is published exactly
  block_housing_units: true       # dwellings per bottom unit are public
  gq_facilities: false
output:
  runs_dir: runs
  releases_dir: releases
"""
    steps = f"""# Next steps

1. Put your geography in `areas.csv`: one row per bottom unit ({levels[-1]}), one column per level
   ({', '.join(levels)}), any code strings; exactly one unit at the top level.
2. Edit `spec.yaml` (attributes, codes, labels, recodes, queries) and `tables.yaml` (the tables you
   publish, as filters over the spec's cells); keep `roles: {{total, identity}}`.
3. Set the budget and its split in `strategy.yaml` (persons) and `units_strategy.yaml` (dwellings).
4. Try it on synthetic inputs: `dptab synth --spec spec.yaml --lookup areas.csv --persons 5000 --seed 1 --out data`
5. `dptab validate --config config.yaml` lists everything that does not fit (exit 2), before any
   budget is spent; then `dptab run config.yaml`, `dptab verify releases/<id>`, `dptab review runs/<id>`.
"""
    texts = {"spec.yaml": spec, "tables.yaml": tables,
             "strategy.yaml": _strategy(f"{name}_persons", "spec.yaml", levels, "1/2",
                                        'total: 1/4, "broad_age*sex": 1/4, detailed: 1/2', "persons strategy"),
             "units_strategy.yaml": _strategy(f"{name}_units", "units", levels, "1/10", "detailed: 1",
                                              "dwellings strategy (occupied / vacant)"),
             "areas.csv": _areas(levels), "config.yaml": config, "NEXT_STEPS.md": steps}
    out_paths = []
    for f in FILES:
        (d / f).write_text(texts[f])
        out_paths.append(d / f)
    return out_paths
