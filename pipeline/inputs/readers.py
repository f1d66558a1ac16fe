"""Readers of the two confidential inputs: persons and units, normalised by the input contract.

They apply the contract (:mod:`pipeline.inputs.contract`, ``schemas/input_contract.yaml``) and
return the normalised lazy frames of ``docs/contracts.md``; row values are checked by
:func:`pipeline.inputs.validation.validate_inputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.inputs.contract import prepare_table
from pipeline.inputs.problems import InputValidationError


def _read(role: str, path: str | Path, contract: dict[str, Any] | None) -> pl.LazyFrame:
    table, problems = prepare_table(role, path, contract)
    if problems or table is None:
        raise InputValidationError(problems)
    return table.normalised()


def read_persons(path: str | Path, contract: dict[str, Any] | None = None) -> pl.LazyFrame:
    """Lazy normalised persons: ``geoid`` Utf8 (15 digits), ``hhgq``, ``voting_age``,
    ``hispanic``, ``cenrace`` Int32, from our layout or the PPMF layout.

    Checks files, layout and column types (raises :class:`InputValidationError`), not the
    row values: call :func:`validate_inputs` before trusting the values.
    """
    return _read("persons", path, contract)


def read_units(path: str | Path, contract: dict[str, Any] | None = None) -> pl.LazyFrame:
    """Lazy normalised units: ``unit_id`` Utf8, ``geoid`` Utf8 (15 digits), ``kind`` Int32
    (0 housing unit, 1–7 GQ type), ``occupied`` Boolean (null for GQ facilities).

    Checks files, layout and column types only, like :func:`read_persons`.
    """
    return _read("units", path, contract)




def input_fingerprint(path: str | Path) -> list[list[object]]:
    """``[[file name, size in bytes, mtime in ns], ...]`` of an input file or of its part files:
    what the run validated. If it is unchanged when the histograms are built, the rows are the
    ones validated and need not be checked again."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    out: list[list[object]] = []
    for f in files:
        st = f.stat()
        out.append([str(f), int(st.st_size), int(st.st_mtime_ns)])
    return out


def read_block_list(path: str | Path, units: pl.LazyFrame, digits: int) -> pl.DataFrame:
    """The public list of bottom-level units (``geography.blocks``: Parquet or CSV with a text
    column ``geoid``), sorted and unique, checked against the units file: every unit's block
    must be listed. Raises :class:`InputValidationError` naming the file, column and blocks.

    With a public list the release shows every listed block (empty ones too), so it does not
    reveal which blocks have a housing unit or a facility.
    """
    from pipeline.inputs.problems import Problem

    p = Path(path)
    try:
        raw = pl.read_csv(p, schema_overrides={"geoid": pl.Utf8}) if p.suffix.lower() == ".csv" else pl.read_parquet(p)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputValidationError([Problem(str(p), "", "unreadable_file", 1, f"cannot read the block list: {exc}")]) \
            from None
    if "geoid" not in raw.columns:
        raise InputValidationError([Problem(str(p), "geoid", "missing_column", 1,
                                            f"the block list needs a text column geoid; found {raw.columns}")])
    blocks = raw.select(pl.col("geoid").cast(pl.Utf8)).unique().sort("geoid")
    bad = blocks.filter(pl.col("geoid").is_null() | (pl.col("geoid").str.len_chars() != digits)
                        | ~pl.col("geoid").str.contains(r"^[0-9]+$"))
    if bad.height:
        raise InputValidationError([Problem(str(p), "geoid", "malformed_geoid", bad.height,
                                            f"block GEOIDs must have {digits} digits",
                                            examples=tuple(str(g) for g in bad["geoid"].head(5).to_list()))])
    missing = (units.select("geoid").unique().collect()
               .join(blocks, on="geoid", how="anti").sort("geoid"))
    if missing.height:
        raise InputValidationError([Problem("units", "geoid", "block_not_in_geography", missing.height,
                                            f"blocks of the units file missing from the block list {p}",
                                            blocks=tuple(missing["geoid"].head(5).to_list()))])
    return blocks
