"""Persons and housing units that can exist together: the three rules a published block (or any
unit) must meet, counted from the release tables alone.

1. persons in households > 0 with 0 occupied housing units (a household needs a home);
2. occupied housing units > 0 with 0 persons (an occupied unit has someone in it);
3. fewer persons in households than occupied housing units (every occupied unit has ≥ 1).

Persons in households = P1 line 1 (total) − P5 line 1 (group quarters); occupied units = H1
line 2. A run with ``joint.households`` publishes 0 of each; 2020 TopDown did not.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

RULES = ("household_persons_without_occupied_units", "occupied_units_without_persons",
         "fewer_household_persons_than_occupied_units")


def joint_violations(tables: pl.DataFrame) -> pl.DataFrame:
    """Violations per geolevel: columns ``geolevel``, ``units`` and one count per rule.

    ``tables``: the long release tables (``geolevel, geoid, table, line, count``, ...) holding
    at least P1 line 1, P5 line 1 and H1 line 2 for the same units.
    """
    def line(table: str, ln: int, name: str) -> pl.DataFrame:
        return (tables.filter((pl.col("table") == table) & (pl.col("line") == ln))
                .select("geolevel", "geoid", pl.col("count").alias(name)))

    both = (line("P1", 1, "persons").join(line("P5", 1, "gq"), on=["geolevel", "geoid"], how="left")
            .join(line("H1", 2, "occupied"), on=["geolevel", "geoid"], how="inner")
            .with_columns(pl.col("gq").fill_null(0))
            .with_columns((pl.col("persons") - pl.col("gq")).alias("household")))
    return (both.group_by("geolevel", maintain_order=True)
            .agg(pl.len().alias("units"),
                 ((pl.col("household") > 0) & (pl.col("occupied") == 0)).sum().alias(RULES[0]),
                 ((pl.col("occupied") > 0) & (pl.col("persons") == 0)).sum().alias(RULES[1]),
                 (pl.col("household") < pl.col("occupied")).sum().alias(RULES[2])))


def release_joint_violations(release: str | Path) -> pl.DataFrame | None:
    """:func:`joint_violations` of a release folder (reads ``tables/P1``, ``P5``, ``H1``); None for
    a release without those tables (another product's shells: the rules are the PL94 tables')."""
    root = Path(release) / "tables"
    if not all((root / f"{t}.parquet").is_file() for t in ("P1", "P5", "H1")):
        return None
    cols = ["geolevel", "geoid", "table", "line", "count"]
    return joint_violations(pl.concat([pl.read_parquet(root / f"{t}.parquet", columns=cols) for t in ("P1", "P5", "H1")],
                                      how="vertical_relaxed"))
