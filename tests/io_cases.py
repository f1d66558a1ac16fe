"""Small, hand-checked persons/units inputs for the io and validation tests (not a test module).

Blocks (15-digit GEOIDs) and what they hold, chosen to satisfy every contract check:

- B1 010010201001000: 5 household persons, 2 in correctional GQ (type 1); 2 occupied + 1 vacant
  housing units, 1 type-1 facility.
- B2 010010201001001: 3 household persons, 2 adults in a nursing facility (type 3); 1 occupied
  housing unit, 1 type-3 facility.
- B3 010010202002005: 4 household persons; 2 occupied housing units.
- B4 020130001001234: no persons; 1 vacant housing unit (allowed).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

B1, B2, B3, B4 = "010010201001000", "010010201001001", "010010202002005", "020130001001234"

# (geoid, hhgq, voting_age, hispanic, cenrace)
PERSON_ROWS = [
    (B1, 0, 1, 0, 1), (B1, 0, 1, 1, 2), (B1, 0, 0, 0, 1), (B1, 0, 0, 1, 7), (B1, 0, 1, 0, 63),
    (B1, 1, 1, 0, 2), (B1, 1, 1, 1, 11),
    (B2, 0, 1, 0, 4), (B2, 0, 0, 0, 4), (B2, 0, 1, 1, 6),
    (B2, 3, 1, 0, 1), (B2, 3, 1, 0, 1),
    (B3, 0, 1, 0, 3), (B3, 0, 1, 0, 3), (B3, 0, 0, 1, 22), (B3, 0, 1, 0, 42),
]

# (unit_id, geoid, kind, occupied)
UNIT_ROWS = [
    ("u1", B1, 0, True), ("u2", B1, 0, True), ("u3", B1, 0, False), ("u4", B1, 1, None),
    ("u5", B2, 0, True), ("u6", B2, 3, None),
    ("u7", B3, 0, True), ("u8", B3, 0, True),
    ("u9", B4, 0, False),
]

PERSONS_SCHEMA = {"geoid": pl.String, "hhgq": pl.Int8, "voting_age": pl.Int8, "hispanic": pl.Int8,
                  "cenrace": pl.Int8}
UNITS_SCHEMA = {"unit_id": pl.String, "geoid": pl.String, "kind": pl.Int8, "occupied": pl.Boolean}


def persons_df(rows: list[tuple] | None = None) -> pl.DataFrame:
    """Persons in our layout (defaults to PERSON_ROWS)."""
    return pl.DataFrame(rows if rows is not None else PERSON_ROWS, schema=PERSONS_SCHEMA, orient="row")


def units_df(rows: list[tuple] | None = None) -> pl.DataFrame:
    """Units in our layout (defaults to UNIT_ROWS)."""
    return pl.DataFrame(rows if rows is not None else UNIT_ROWS, schema=UNITS_SCHEMA, orient="row")


def to_ppmf(df: pl.DataFrame, integers: bool = False) -> pl.DataFrame:
    """The same persons in the PPMF layout: GEOID split into components, codes 1/2, "01" races.

    ``integers=True`` stores the components and CENRACE as integers (as a CSV reader would).
    """
    g = pl.col("geoid")
    out = df.select(
        pl.lit("20210428_eps12-2_P").alias("VINTAGE"),
        g.str.slice(0, 2).alias("TABBLKST"), g.str.slice(2, 3).alias("TABBLKCOU"),
        g.str.slice(5, 6).alias("TABTRACTCE"), g.str.slice(11, 1).alias("TABBLKGRPCE"),
        g.str.slice(11, 4).alias("TABBLK"), pl.lit("3").alias("RTYPE"),
        pl.col("hhgq").alias("GQTYPE_PL"), (pl.col("voting_age") + 1).alias("VOTING_AGE"),
        (pl.col("hispanic") + 1).alias("CENHISP"),
        pl.col("cenrace").cast(pl.String).str.zfill(2).alias("CENRACE"),
        pl.int_range(pl.len()).alias("EPNUM"),
    )
    if integers:
        out = out.with_columns(pl.col(c).cast(pl.Int64) for c in
                               ["TABBLKST", "TABBLKCOU", "TABTRACTCE", "TABBLKGRPCE", "TABBLK", "CENRACE"])
    return out


def write(df: pl.DataFrame, path: Path) -> Path:
    """Plain Parquet write (tests only; the library's writer is write_parquet_atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return path
