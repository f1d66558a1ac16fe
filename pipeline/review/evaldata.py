"""Real-data evaluation set: Rhode Island 2010 block counts → persons and units Parquet.

Source: ``ri_2010_block.csv`` — every Rhode Island 2010 census block (25,181 blocks,
1,052,567 persons), the exact published 2010 P.L. 94-171 counts of total population (``pop``)
and population 18+ (``vap``), each split into Hispanic (any race) and 7 non-Hispanic groups.
Compiled by Kenny & McCartan, alarm-redist/census-2020 (``census-vest-2010/ri_2010_block.csv``);
data licensed CC BY-SA 4.0 (the census counts themselves are public domain, US Census Bureau).
Only the census columns are read; the election columns are ignored.

What is exact and what is assigned (the documented, seeded rule; seed default 2010):

* **Exact** (reproduced block by block, tested): per block, persons by voting age (``vap`` and
  ``pop − vap``) × {Hispanic, non-Hispanic White, Black, AIAN, Asian, NHPI, Some Other Race,
  two or more races}. So every margin built from these — total, voting age, Hispanic, the 7
  non-Hispanic groups, and their voting-age splits — is the real 2010 count at every level.
* **Assigned — race of Hispanic persons**: each block × voting-age group's Hispanic count is
  split over race by one multinomial draw with the 2010 US shares of Hispanic persons by race
  (:data:`HISPANIC_RACE_SHARES`; Census 2010 Brief C2010BR-04, rounded).
* **Assigned — race combinations** of "two or more races" (non-Hispanic, and Hispanic persons
  drawn as two or more): one multinomial draw over CENRACE 7–63 with fixed illustrative
  weights (:data:`TWO_OR_MORE_WEIGHTS`: the common pairs dominate, three races share 4%, four
  or more 1%).
* **Assigned — group quarters**: none; everyone lives in a household (``hhgq = 0``), since the
  source has no GQ information.
* **Assigned — housing units**: a populated block gets ``occupied = max(1, round(pop / 2.44))``
  occupied units (2.44 persons per household, about the 2010 RI average; never more units than
  persons) and ``Binomial(occupied, 0.125)`` vacant ones; an unpopulated block gets one vacant
  unit, so that every one of the 25,181 blocks is in the geography.

Accuracy measured on this set is real only for the exact margins above; figures for
detailed race, GQ or occupancy reflect the assignment rule, not 2010 reality (ACCURACY.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import InputError
from pipeline.files import write_parquet_atomic

DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "ri_2010_block.csv"
GROUPS = ("hisp", "white", "black", "aian", "asian", "nhpi", "other", "two")
#: CENRACE of the non-Hispanic single-race groups (1–6); "two" is drawn over 7–63.
GROUP_CENRACE = {"white": 1, "black": 2, "aian": 3, "asian": 4, "nhpi": 5, "other": 6}
#: Race of Hispanic persons, US 2010 (CENRACE 1–6, then "two or more" = index 6).
HISPANIC_RACE_SHARES = np.array([0.530, 0.025, 0.014, 0.004, 0.001, 0.366, 0.060])
PERSONS_PER_HOUSEHOLD = 2.44
VACANT_PER_OCCUPIED = 0.125
DEFAULT_SEED = 2010


def _two_or_more_weights() -> np.ndarray:
    """Weights over CENRACE 7–63 (57 codes) summing to 1."""
    w = np.zeros(57)
    pairs = {7: .20, 8: .16, 9: .16, 10: .02, 11: .20, 12: .03, 13: .01, 14: .005, 15: .03,
             16: .01, 17: .005, 18: .01, 19: .01, 20: .01, 21: .005}  # the 15 two-race codes
    for code, v in pairs.items():
        w[code - 7] = v
    w[22 - 7:41 - 7 + 1] = 0.04 / 20   # three races
    w[42 - 7:] = 0.01 / 22             # four, five and six races
    return w / w.sum()


TWO_OR_MORE_WEIGHTS = _two_or_more_weights()


class EvalDataError(InputError):
    """The source file is missing, malformed or internally inconsistent (names file and rows)."""


def read_ri2010(source: str | Path = DEFAULT_SOURCE) -> pl.DataFrame:
    """The census columns of ``ri_2010_block.csv``: ``geoid`` (15 digits), ``pop``, ``vap`` and
    ``pop_<g>``, ``vap_<g>`` for the 8 groups (Int64), checked for consistency."""
    source = Path(source)
    if not source.is_file():
        raise EvalDataError(f"{source}: not found")
    cols = ["GEOID", "pop", "vap"] + [f"{a}_{g}" for a in ("pop", "vap") for g in GROUPS]
    try:
        df = pl.read_csv(source, columns=cols, schema_overrides={"GEOID": pl.Utf8})
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise EvalDataError(f"{source}: cannot read the census columns {cols}: {exc}") from exc
    df = df.rename({"GEOID": "geoid"}).with_columns(pl.exclude("geoid").cast(pl.Int64))
    bad = df.filter(pl.col("geoid").str.len_chars() != 15)
    if bad.height:
        raise EvalDataError(f"{source}: {bad.height} GEOID(s) not 15 digits, e.g. {bad['geoid'].head(3).to_list()}")
    checks = {
        "pop != sum of pop groups": pl.col("pop") != pl.sum_horizontal([f"pop_{g}" for g in GROUPS]),
        "vap != sum of vap groups": pl.col("vap") != pl.sum_horizontal([f"vap_{g}" for g in GROUPS]),
        "vap_g > pop_g or negative": pl.any_horizontal(
            [(pl.col(f"vap_{g}") > pl.col(f"pop_{g}")) | (pl.col(f"vap_{g}") < 0) for g in GROUPS]),
    }
    for what, expr in checks.items():
        rows = df.with_row_index("row").filter(expr)
        if rows.height:
            raise EvalDataError(f"{source}: {what} in {rows.height} row(s), e.g. data rows "
                                f"{(rows['row'] + 1).head(5).to_list()} (GEOIDs {rows['geoid'].head(3).to_list()})")
    return df.sort("geoid")


def _race_counts(df: pl.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Persons per (block, voting age, hispanic, cenrace): int64 ``(n_blocks, 2, 2, 63)``."""
    n = df.height
    out = np.zeros((n, 2, 2, 63), dtype=np.int64)
    for va in (0, 1):
        def count(g: str) -> np.ndarray:
            vap = df[f"vap_{g}"].to_numpy()
            return vap if va == 1 else df[f"pop_{g}"].to_numpy() - vap

        for g, code in GROUP_CENRACE.items():
            out[:, va, 0, code - 1] = count(g)
        out[:, va, 0, 6:] = rng.multinomial(count("two"), TWO_OR_MORE_WEIGHTS)
        hisp = rng.multinomial(count("hisp"), HISPANIC_RACE_SHARES)        # (n, 7)
        out[:, va, 1, :6] = hisp[:, :6]
        out[:, va, 1, 6:] = rng.multinomial(hisp[:, 6], TWO_OR_MORE_WEIGHTS)
    return out


def ri2010_persons(df: pl.DataFrame, seed: int = DEFAULT_SEED) -> pl.DataFrame:
    """Person records in our layout (``geoid, hhgq, voting_age, hispanic, cenrace``), one row each."""
    rng = np.random.default_rng([seed, 0])
    counts = _race_counts(df, rng)
    flat = counts.reshape(-1)
    idx = np.repeat(np.arange(flat.size, dtype=np.int64), flat)
    block, va, hisp, race = np.unravel_index(idx, counts.shape)
    geoids = df["geoid"].to_numpy()
    return pl.DataFrame({
        "geoid": pl.Series(geoids[block], dtype=pl.Utf8),
        "hhgq": pl.Series(np.zeros(idx.size, dtype=np.int32)),
        "voting_age": pl.Series(va.astype(np.int32)),
        "hispanic": pl.Series(hisp.astype(np.int32)),
        "cenrace": pl.Series((race + 1).astype(np.int32)),
    })


def ri2010_units(df: pl.DataFrame, seed: int = DEFAULT_SEED) -> pl.DataFrame:
    """Housing units (``unit_id, geoid, kind, occupied``) by the rule in the module docstring."""
    rng = np.random.default_rng([seed, 1])
    pop = df["pop"].to_numpy()
    occupied = np.where(pop > 0, np.maximum(1, np.rint(pop / PERSONS_PER_HOUSEHOLD)), 0).astype(np.int64)
    occupied = np.minimum(occupied, pop)
    vacant = np.where(pop > 0, rng.binomial(occupied, VACANT_PER_OCCUPIED), 1).astype(np.int64)
    n_units = occupied + vacant
    block = np.repeat(np.arange(df.height), n_units)
    start = np.repeat(np.cumsum(n_units) - n_units, n_units)
    k = np.arange(block.size) - start                       # unit number within its block
    geoids = df["geoid"].to_numpy()[block]
    return pl.DataFrame({
        "unit_id": pl.Series(np.char.add(np.char.add(geoids.astype(str), "-"), k.astype(str)), dtype=pl.Utf8),
        "geoid": pl.Series(geoids, dtype=pl.Utf8),
        "kind": pl.Series(np.zeros(block.size, dtype=np.int32)),
        "occupied": pl.Series(k < occupied[block]),
    })


#: A run config for the evaluation set (written next to the Parquet files): the 2020 production
#: strategies, seeded noise so the ACCURACY.md figures can be reproduced, and
#: ``confidential: false`` because the counts are public (the assigned detail is synthetic).
RUN_CONFIG = """# Rhode Island 2010 evaluation set: public block counts, 2020 production strategies.
dataset_id: ri2010-eval
title: "Rhode Island 2010 evaluation set (exact block margins, assigned detail; seed {seed})"
confidential: false
spec: pl94
inputs:
  persons: persons.parquet
  units: units.parquet
privacy:
  strategy: census2020_pl94
  units_strategy: census2020_units
  delta: 1.0e-10
  lifetime_rho: "1000"
  ledger: runs/ledger.sqlite
  randomness: seeded
  seed: 2021
output:
  runs_dir: runs
  releases_dir: releases
execution:
  workers: 2
"""


def write_ri2010(out_dir: str | Path, source: str | Path = DEFAULT_SOURCE, seed: int = DEFAULT_SEED
                 ) -> dict[str, Path]:
    """Write ``persons.parquet``, ``units.parquet``, ``config.yaml`` (:data:`RUN_CONFIG`) and
    ``README.md`` (attribution and the assignment rule) to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = read_ri2010(source)
    paths = {"persons": out / "persons.parquet", "units": out / "units.parquet", "readme": out / "README.md"}
    write_parquet_atomic(ri2010_persons(df, seed), paths["persons"])
    write_parquet_atomic(ri2010_units(df, seed), paths["units"])
    paths["config"] = out / "config.yaml"
    paths["config"].write_text(RUN_CONFIG.format(seed=seed))
    paths["readme"].write_text(
        "# Rhode Island 2010 evaluation set (dptab eval-data ri2010)\n\n"
        f"Built from `{Path(source).name}` with seed {seed} by `pipeline/review/evaldata.py`.\n\n"
        + (__doc__ or "").split("\n", 2)[2])
    return paths
