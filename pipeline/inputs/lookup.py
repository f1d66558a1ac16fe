"""A lookup-file geography (``geography.lookup``): read and check it completely.

The file (Parquet or CSV) has one text column per level (top to bottom, named as in
``geography.levels``) and one row per bottom unit, naming the unit's code at every level, e.g.

    country,region,district,area
    K,K-N,K-N-01,E00000001

Codes are any non-empty strings. :func:`read_lookup` reports every problem at once, each naming
the file, column and first rows (exit 2): a missing level column, an empty code (a broken chain),
a bottom unit listed twice, a code under two parents, more than one unit at the top level.
Optional columns ``<level>_name`` give readable names (published in the tables' ``name``
column); a code with two different names is refused too.
:func:`unknown_units` finds the rows of a persons or units file whose unit is not in the lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from pipeline.inputs.problems import MAX_EXAMPLES, READ_ERRORS, InputValidationError, Problem, first_line


def _read(p: Path, names: Sequence[str]) -> pl.DataFrame:
    if p.suffix.lower() == ".csv":
        return pl.read_csv(p, infer_schema=False)  # every column as text: codes keep leading zeros
    return pl.read_parquet(p)


def _rows(df: pl.DataFrame, cond: pl.Expr, show: pl.Expr) -> tuple[tuple[int, ...], tuple[str, ...]]:
    hit = (df.with_row_index("_row").filter(cond).head(MAX_EXAMPLES)
           .select(pl.col("_row"), show.cast(pl.Utf8).fill_null("null").alias("_show")))
    return tuple(int(r) for r in hit["_row"]), tuple(str(v) for v in hit["_show"])


def lookup_problems(path: str | Path, names: Sequence[str]) -> tuple[pl.DataFrame | None, list[Problem]]:
    """The lookup table (one Utf8 column per level, in level order, sorted by the bottom code) and
    every problem found; the table is None when there are problems."""
    p = Path(path)
    label = str(p)
    try:
        raw = _read(p, names)
    except READ_ERRORS as exc:
        return None, [Problem(label, "", "unreadable_file", 1, f"cannot read the geography lookup: {first_line(exc)}")]
    problems: list[Problem] = []
    missing = [n for n in names if n not in raw.columns]
    for n in missing:
        problems.append(Problem(label, n, "missing_column", 1,
                                f"the lookup needs one column per level ({', '.join(names)}); found {raw.columns}"))
    if missing:
        return None, problems
    if raw.height == 0:
        return None, [Problem(label, "", "empty_file", 1, "the lookup has no rows")]
    for n in names:
        if raw.schema[n] not in (pl.Utf8, pl.Categorical) and not raw.schema[n].is_integer():
            problems.append(Problem(label, n, "wrong_type", raw.height,
                                    f"column has type {raw.schema[n]}, expected text codes"))
    if problems:
        return None, problems
    name_cols = [f"{n}_name" for n in names if f"{n}_name" in raw.columns]
    df = raw.select([pl.col(n).cast(pl.Utf8).str.strip_chars() for n in names]
                    + [pl.col(c).cast(pl.Utf8).str.strip_chars() for c in name_cols])
    for n in names:
        bad = pl.col(n).is_null() | (pl.col(n) == "")
        cnt = int(df.select(bad.sum()).item())
        if cnt:
            rows, shown = _rows(df, bad, pl.concat_str([pl.col(c).fill_null("null") for c in names], separator=" > "))
            problems.append(Problem(label, n, "missing_chain", cnt,
                                    f"a bottom unit without a {n} code: every unit needs its code at every level",
                                    rows, shown))
    bottom = names[-1]
    dup = pl.col(bottom).is_duplicated() & pl.col(bottom).is_not_null()
    cnt = int(df.select(dup.sum()).item())
    if cnt:
        rows, shown = _rows(df, dup, pl.col(bottom))
        problems.append(Problem(label, bottom, "duplicate_unit", cnt, f"a {bottom} code listed more than once", rows, shown))
    ok = df.filter(pl.all_horizontal([pl.col(n).is_not_null() & (pl.col(n) != "") for n in names]))
    for up, n in zip(names[:-1], names[1:]):
        two = ok.group_by(n).agg(pl.col(up).n_unique().alias("k")).filter(pl.col("k") > 1)
        if two.height:
            bad_codes = two[n].to_list()
            rows, shown = _rows(df, pl.col(n).is_in(bad_codes), pl.format(f"{n} {{}} in {up} {{}}", pl.col(n), pl.col(up)))
            problems.append(Problem(label, n, "two_parents", two.height,
                                    f"a {n} code under more than one {up} (the hierarchy must nest)", rows, shown))
    for n in names:
        if f"{n}_name" not in name_cols:
            continue
        two = (ok.group_by(n).agg(pl.col(f"{n}_name").n_unique().alias("k")).filter(pl.col("k") > 1))
        if two.height:
            rows, shown = _rows(df, pl.col(n).is_in(two[n].to_list()),
                                pl.format(f"{n} {{}} named {{}}", pl.col(n), pl.col(f"{n}_name")))
            problems.append(Problem(label, f"{n}_name", "two_names", two.height,
                                    f"a {n} code with more than one name", rows, shown))
    tops = ok[names[0]].unique().sort()
    if tops.len() > 1:
        rows, shown = _rows(df, pl.col(names[0]) != tops[0], pl.col(names[0]))
        problems.append(Problem(label, names[0], "several_roots", tops.len(),
                                f"the top level {names[0]} must have exactly one unit; found {tops.head(5).to_list()}",
                                rows, shown))
    if problems:
        return None, problems
    return df.sort(bottom), []


def level_columns(columns: Sequence[str]) -> list[str]:
    """The level columns of a lookup table, top to bottom (every column but the ``<level>_name`` ones)."""
    return [c for c in columns if not (c.endswith("_name") and c[:-5] in columns)]


def read_lookup(path: str | Path, names: Sequence[str]) -> pl.DataFrame:
    """The checked lookup table (see :func:`lookup_problems`); InputValidationError if it is bad."""
    df, problems = lookup_problems(path, names)
    if problems or df is None:
        raise InputValidationError(problems)
    return df


def unknown_units(label: str, column: str, geoids: pl.LazyFrame, lookup: pl.DataFrame, bottom: str,
                  row_show: pl.Expr | None = None) -> list[Problem]:
    """Rows of an input whose unit code (column ``geoid`` of ``geoids``, one row per input row)
    is not a bottom unit of the lookup: one Problem naming the file, column and first rows."""
    known = lookup.select(pl.col(bottom).alias("geoid"))
    rows = (geoids.with_row_index("_row").filter(pl.col("geoid").is_not_null())
            .join(known.lazy(), on="geoid", how="anti"))
    n = int(rows.select(pl.len()).collect(engine="streaming").item())
    if not n:
        return []
    head = rows.sort("_row").head(MAX_EXAMPLES).collect(engine="streaming")
    return [Problem(label, column, "unknown_unit", n,
                    f"{bottom} codes that are not in the geography lookup",
                    tuple(int(r) for r in head["_row"]), tuple(str(g) for g in head["geoid"]))]
