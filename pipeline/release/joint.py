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


def joint_violations(persons: pl.LazyFrame, gq: pl.LazyFrame, occupied: pl.LazyFrame) -> pl.DataFrame:
    """Violations per geolevel: columns ``geolevel``, ``units`` and one count per rule.

    Each argument holds one table line's rows (``geolevel, geoid, count``): P1 line 1 (persons),
    P5 line 1 (persons in group quarters; a unit without a row has 0) and H1 line 2 (occupied
    housing units); the units of ``persons`` and ``occupied`` are counted.
    """
    def named(rows: pl.LazyFrame, name: str) -> pl.LazyFrame:
        return rows.select("geolevel", "geoid", pl.col("count").alias(name))

    on = ["geolevel", "geoid"]
    both = (named(persons, "persons").join(named(gq, "gq"), on=on, how="left", maintain_order="left")
            .join(named(occupied, "occupied"), on=on, how="inner", maintain_order="left")
            .with_columns(pl.col("gq").fill_null(0))
            .with_columns((pl.col("persons") - pl.col("gq")).alias("household")))
    return (both.group_by("geolevel", maintain_order=True)
            .agg(pl.len().alias("units"),
                 ((pl.col("household") > 0) & (pl.col("occupied") == 0)).sum().alias(RULES[0]),
                 ((pl.col("occupied") > 0) & (pl.col("persons") == 0)).sum().alias(RULES[1]),
                 (pl.col("household") < pl.col("occupied")).sum().alias(RULES[2]))
            .collect(engine="streaming"))


def release_joint_violations(release: str | Path) -> pl.DataFrame | None:
    """:func:`joint_violations` of a release folder (reads ``tables/P1``, ``P5``, ``H1``); None for
    a release without those tables (another product's shells: the rules are the PL94 tables').

    Only the three lines are read, each file's rows filtered a batch at a time as they are decoded
    (polars' streaming engine): one line of every unit, never a whole table — the three tables
    read whole were 10.9 GB at 100 M persons (P1 alone is 127 M rows there), the three lines
    ~0.5 GB."""
    root = Path(release) / "tables"
    if not all((root / f"{t}.parquet").is_file() for t in ("P1", "P5", "H1")):
        return None

    def line(table: str, ln: int) -> pl.LazyFrame:
        rows = pl.scan_parquet(root / f"{table}.parquet").filter(pl.col("line") == ln)
        return rows.select("geolevel", "geoid", "count")

    return joint_violations(line("P1", 1), line("P5", 1), line("H1", 2))
