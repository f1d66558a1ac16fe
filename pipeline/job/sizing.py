"""Sizing a run before it starts: ``dptab run CONFIG --plan``.

What an operator of a large run wants to know before committing a machine (and budget) to it:
the work list of :func:`pipeline.job.plan.plan` — per run kind and level the units, parents,
shards and the largest shard — how many noisy answers will be drawn, whether the ledger still
has the budget, and a rough wall time and peak memory.

Nothing here reserves budget, creates a run directory or reads a confidential value: the
geography comes from the units file's block codes (or the public lookup / block list the config
names), as the run itself builds it, and the persons count from the Parquet footer.

The time and memory figures are a linear model in persons and blocks fitted to whole-job runs
measured with ``benchmarks/scale.py`` on the 2-core / 24 GB reference machine (BENCHMARKS.md,
"National scale"); they are meant for sizing (±50%), not as a promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.model.config import RunConfig
from pipeline.model.geography import Geography

#: The sizing model: whole-job seconds per million persons (2 workers) and peak total RSS in GB
#: as a base plus GB per million blocks, per estimator. ``topdown``: fitted to the
#: ``benchmarks/scale.py`` runs in BENCHMARKS.md (session 6, after the shard window and the
#: streaming measurement check): 10 M persons (234,921 blocks) 124 s and 2.27 GB, 30 M 337 s and
#: 2.37 GB, 100 M (2.33 M blocks) 1,257 s and 3.38 GB; the 331 M run (5.63 M blocks) took 3,564 s
#: (session 7: 3,652 s, with other work on the machine; session 8: 3,495 s) and peaked at 8.08 GB
#: in session 7 and 8.91 GB in session 8, in publishing (the writer beside its microdata and
#: data-file-check children), which sets the slope — 100 M is then overestimated (4.9 GB), the
#: safe side for sizing a machine. ``full``: fitted to session 26's runs (BENCHMARKS.md, "Session
#: 26"): 10 M persons (171,303 blocks) 100.5-109.6 s and 2.04-2.64 GB, 30 M (512,583) 279 s and
#: 3.0 GB, 100 M (1.70 M blocks) 1,040 s and 3.9 GB (overestimated: 4.6), the 331 M run (5.63 M
#: blocks) 3,401 s and 9.74 GB. ``workers`` other than 2 scale the time.
REFERENCE: dict[str, dict[str, float]] = {
    "topdown": {"seconds_per_million_persons": 11.5, "gb_base": 2.0, "gb_per_million_blocks": 1.23},
    "full": {"seconds_per_million_persons": 10.5, "gb_base": 2.4, "gb_per_million_blocks": 1.30},
}


@dataclass(frozen=True)
class StepSize:
    """One (run kind, level) step: ``units`` of the level, ``parents`` (units of the level above),
    ``shards`` (independent work pieces), ``largest_shard_cells`` (children x histogram cells of
    the largest shard: what one shard holds in memory), ``answers`` (noisy answers drawn: every
    answer of every query of the level; with ``topdown`` an upper bound, since answers under a
    published zero are skipped)."""

    kind: str
    level: str
    units: int
    parents: int
    shards: int
    largest_shard_cells: int
    answers: int


@dataclass(frozen=True)
class RunSizing:
    """The whole plan: ``steps``, ``persons`` and ``blocks`` of the input, the run's ``rho`` and
    the dataset's ``budget_left`` before it (None: no ledger yet, nothing spent), and the model's
    ``seconds`` and ``peak_gb``."""

    estimator: str
    workers: int
    persons: int
    blocks: int
    steps: list[StepSize]
    rho: Fraction
    lifetime_rho: Fraction
    budget_left: Fraction
    seconds: float
    peak_gb: float


def size_run(cfg: RunConfig, geography: Geography) -> RunSizing:
    """The plan of a run of ``cfg`` on ``geography`` (see the module doc)."""
    from pipeline.job.context import configured_strategies, total_rho
    from pipeline.job.plan import level_shard_bounds
    from pipeline.model.spec import load_spec

    strategies = configured_strategies(cfg)
    steps = []
    persons_cells = load_spec(cfg.spec).n_cells  # both run kinds are sharded by the persons' work
    for kind, strategy in strategies.items():
        spec = load_spec(cfg.spec if kind == "persons" else "units")
        for i, lv in enumerate(geography.levels):
            bounds = level_shard_bounds(geography, lv.name, persons_cells, cfg.execution.shard_target_cells)
            if i == 0:
                largest = lv.n_units
            else:
                ptr = geography.levels[i - 1].child_ptr
                largest = int(np.max(ptr[bounds[1:]] - ptr[bounds[:-1]]))
            per_unit = sum(spec.query(q).n_answers for q in strategy.queries(lv.name)) \
                if lv.name in strategy.level_names else 0
            steps.append(StepSize(kind, lv.name, int(lv.n_units),
                                  int(geography.levels[i - 1].n_units) if i else 0, len(bounds) - 1,
                                  largest * spec.n_cells, per_unit * int(lv.n_units)))
    persons = _persons(cfg.inputs.persons)
    blocks = int(geography.levels[-1].n_units)
    rho = total_rho(strategies)
    lifetime = Fraction(cfg.privacy.lifetime_rho)
    left = lifetime - _spent(cfg)
    ref = REFERENCE[cfg.postprocess.estimator]
    # post-processing is most of the wall time and scales with the worker processes
    seconds = ref["seconds_per_million_persons"] * persons / 1e6 * 2 / max(1, min(cfg.execution.workers, 2))
    peak = ref["gb_base"] + ref["gb_per_million_blocks"] * blocks / 1e6
    return RunSizing(cfg.postprocess.estimator, cfg.execution.workers, persons, blocks, steps, rho, lifetime,
                     left, seconds, peak)


def _persons(path: Path) -> int:
    """Rows of the persons input (a Parquet file or a folder of part files), from the footers."""
    p = Path(path)
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _spent(cfg: RunConfig) -> Fraction:
    """ρ the ledger has counted for the dataset (0 when there is no ledger yet); opened read-only
    in effect: nothing is reserved."""
    from pipeline.privacy.ledger import Ledger

    if not cfg.privacy.ledger.exists():
        return Fraction(0)
    return Ledger(cfg.privacy.ledger).spent(cfg.dataset_id)


def plan_run(config_path: str | Path) -> RunSizing:
    """Size the run a config describes, from its inputs' geography and row count (nothing is
    validated row by row, reserved or written; see the module doc)."""
    from pipeline.inputs.contract import contract_for
    from pipeline.inputs.readers import read_units
    from pipeline.job.stages import input_geography
    from pipeline.model.config import load_config
    from pipeline.model.spec import load_spec

    cfg = load_config(config_path)
    contract = contract_for(load_spec(cfg.spec), lookup=cfg.geography.lookup is not None)
    _, geography = input_geography(cfg, read_units(cfg.inputs.units, contract))
    return size_run(cfg, geography)
