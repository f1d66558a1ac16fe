"""Total validation of the persons and units inputs against ``schemas/input_contract.yaml``.

:func:`validate_inputs` finds *every* problem and raises them together, or returns the
normalised lazy frames with a small summary. All checks are vectorised polars expressions
run with the streaming engine, so memory grows with the number of blocks, not with the number
of persons or units (the duplicate-id check counts distinct ids in passes of at most
``row_checks.IDS_PER_PASS`` ids, one range of hash values each):

- pass 1 per file: one ``select`` of per-check offending-row counts (plus row counts and the
  hash-distinct count of unit ids) — :mod:`pipeline.row_checks`;
- pass 2 per file: one ``group_by(geoid)`` of the valid rows, joined persons x units per block,
  for the cross-file checks (2020 edit constraints, ARCHITECTURE §6);
- only when a check fails: a short scan that fetches its first offending rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from pipeline.inputs.contract import PreparedTable, contract_for, load_contract, prepare_table
from pipeline.inputs.lookup import level_columns, unknown_units
from pipeline.inputs.problems import MAX_EXAMPLES, READ_ERRORS, InputValidationError, Problem, first_line
from pipeline.inputs.row_checks import Check, row_checks, run_row_checks, valid_rows
from pipeline.model.spec import HistogramSpec, SpecError, load_spec

N_GQ = 7  # GQ types 1..7 (hhgq codes; unit kinds)


def facility_attribute(spec: HistogramSpec) -> str | None:
    """The persons attribute that says household (code 0) or group-quarters type (codes 1..7, the
    unit kinds of the units file): the attribute of the spec's ``bound`` query (pl94: ``hhgq``),
    or None for a spec that declares no such role (no facility checks or invariants apply)."""
    if not spec.has_role("bound"):
        return None
    by = spec.query(spec.role("bound")).by
    if len(by) != 1:
        return None
    return spec.factor_map(by[0])[0]


@dataclass(frozen=True)
class InputSummary:
    """Counts over the validated inputs (all rows are valid when this exists)."""

    persons_layout: str
    persons_rows: int
    units_rows: int
    blocks: int  # distinct blocks with at least one unit or facility
    person_blocks: int  # distinct blocks with at least one person
    household_persons: int
    gq_persons: int
    housing_units: int
    occupied_units: int
    gq_facilities: int

    def lines(self) -> list[str]:
        """Human-readable summary lines (for the CLI)."""
        return [
            f"persons:           {self.persons_rows:>14,}  ({self.persons_layout} layout)",
            f"  in households:   {self.household_persons:>14,}",
            f"  in group quarters:{self.gq_persons:>13,}",
            f"units:             {self.units_rows:>14,}",
            f"  housing units:   {self.housing_units:>14,}  ({self.occupied_units:,} occupied)",
            f"  GQ facilities:   {self.gq_facilities:>14,}",
            f"blocks:            {self.blocks:>14,}  ({self.person_blocks:,} with persons)",
        ]


@dataclass(frozen=True)
class ValidatedInputs:
    """Normalised lazy frames of valid inputs (``docs/contracts.md``) and their summary."""

    persons: pl.LazyFrame
    units: pl.LazyFrame
    summary: InputSummary
    persons_path: Path
    units_path: Path


def _block_tables(persons: PreparedTable, p_checks: list[Check],
                  units: PreparedTable, u_checks: list[Check], gq: str | None) -> pl.LazyFrame:
    """Pass 2: per-block persons and units counts, full-joined on geoid.

    Rows whose GEOID is invalid cannot be placed and are left out. Counts use valid rows only;
    ``p_bad``/``u_bad`` count the block's other invalid rows, so that the cross-file checks can
    skip such blocks: one bad row is reported once, not again as a knock-on block problem.
    """
    def per_block(table: PreparedTable, checks: list[Check], values: dict[str, pl.Expr]) -> pl.LazyFrame:
        geo = set(table.layout_spec["geoid"])
        return (table.source.scan().filter(valid_rows([c for c in checks if c.column in geo]))
                .select(table.geoid_expr().alias("geoid"), valid_rows(checks).alias("_ok"),
                        *[e.alias(n) for n, e in values.items()]))

    ok = pl.col("_ok")
    gqc = pl.col("_gq")
    if gq is None:  # a spec without households and group quarters: everyone counts as in a household
        pb = (per_block(persons, p_checks, {}).group_by("geoid")
              .agg([pl.len().alias("p_rows"), (~ok).sum().alias("p_bad"), ok.sum().alias("persons"),
                    ok.sum().alias("hh")]
                   + [pl.lit(0, pl.UInt32).alias(f"g{k}") for k in range(1, N_GQ + 1)]))
    else:
        pb = (per_block(persons, p_checks, {"_gq": persons.target_expr(gq)}).group_by("geoid")
              .agg([pl.len().alias("p_rows"), (~ok).sum().alias("p_bad"), ok.sum().alias("persons"),
                    (ok & (gqc == 0)).fill_null(False).sum().alias("hh")]
                   + [(ok & (gqc == k)).fill_null(False).sum().alias(f"g{k}") for k in range(1, N_GQ + 1)]))
    kind, occ = pl.col("kind"), pl.col("occ")
    ub = (per_block(units, u_checks, {"kind": units.target_expr("kind"), "occ": units.target_expr("occupied")})
          .group_by("geoid")
          .agg([pl.len().alias("units"), (~ok).sum().alias("u_bad"), (ok & (kind == 0)).fill_null(False).sum().alias("hu"),
                (ok & (kind == 0) & occ).fill_null(False).sum().alias("occ")]
               + [(ok & (kind == k)).fill_null(False).sum().alias(f"f{k}") for k in range(1, N_GQ + 1)]))
    j = pb.join(ub, on="geoid", how="full", coalesce=True)
    counts = [c for c in j.collect_schema().names() if c != "geoid"]
    return j.with_columns(pl.col("units").is_not_null().alias("in_units"),
                          *[pl.col(c).fill_null(0).cast(pl.Int64) for c in counts])


def _row_frame(table: PreparedTable, checks: list[Check], cols: dict[str, pl.Expr]) -> pl.LazyFrame:
    """Rows of ``table`` with a valid GEOID: global row number ``_row`` and normalised ``cols``.

    (Blocks in the cross checks other than block_not_in_units hold only fully valid rows.)
    """
    geo = set(table.layout_spec["geoid"])
    return (table.source.scan().with_row_index("_row").filter(valid_rows([c for c in checks if c.column in geo]))
            .select(pl.col("_row"), table.geoid_expr().alias("geoid"), *[e.alias(n) for n, e in cols.items()]))


def _offending_rows(rows: pl.LazyFrame, keys: pl.LazyFrame, row_filter: pl.Expr, table: PreparedTable,
                    show: pl.Expr) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """First rows (by row number) that fall in the offending ``keys`` (geoid [, type])."""
    on = keys.collect_schema().names()
    df = (rows.filter(row_filter).join(keys, on=on, how="semi").sort("_row").head(MAX_EXAMPLES)
          .select("_row", show.alias("_show")).collect(engine="streaming"))
    found = tuple(int(r) for r in df["_row"])
    shown = [str(v) for v in df["_show"]]
    if len(table.source.files) > 1:
        shown = [f"{v} (at {table.source.locate(r)})" for r, v in zip(found, shown)]
    return found, tuple(shown)


def _cross_checks(persons: PreparedTable, p_checks: list[Check], units: PreparedTable,
                  u_checks: list[Check], gq: str | None = None,
                  lookup: bool = False) -> tuple[list[Problem], dict[str, int]]:
    """Cross-file checks per block; returns problems and the summary counts.

    A problem names the table whose rows must change: person rows for constraints on persons,
    unit rows for facilities or occupied units in excess, with the first such rows and blocks.
    ``gq``: the persons attribute of household / group-quarters type (None: a spec without
    one, whose persons are not checked against housing units and facilities). ``lookup``: the
    geography is a lookup file, not the blocks of the units file (persons need no unit there).
    """
    enabled = dict(load_contract().get("cross_checks", {}))
    if gq is None:
        enabled.update({n: False for n in ("gq_without_facility", "household_without_housing_unit",
                                           "household_without_occupied_unit", "facility_without_persons",
                                           "occupied_exceeds_household")})
    if lookup:
        enabled["block_not_in_units"] = False
    j = _block_tables(persons, p_checks, units, u_checks, gq)
    ks = range(1, N_GQ + 1)
    g = {k: pl.col(f"g{k}") for k in ks}
    f = {k: pl.col(f"f{k}") for k in ks}
    inu = pl.col("in_units") & (pl.col("p_bad") == 0) & (pl.col("u_bad") == 0)  # placed, all rows valid
    hh, hu, occ = pl.col("hh"), pl.col("hu"), pl.col("occ")
    gq_bad = {k: (g[k] > 0) & (f[k] == 0) & inu for k in ks}
    fac_bad = {k: (f[k] > g[k]) & inu for k in ks}

    def per_type(bad: dict[int, pl.Expr], col: str) -> pl.LazyFrame:
        return pl.concat([j.filter(bad[k]).select("geoid", pl.lit(k, pl.Int32).alias(col)) for k in ks])

    def blocks_of(cond: pl.Expr) -> pl.LazyFrame:
        return j.filter(cond).select("geoid")

    gq_col = persons.layout_spec["targets"][gq] if gq is not None else ""
    gqc, kind = pl.col("_gq"), pl.col("kind")
    everyone = pl.lit(True)
    # name: (table, column, block condition, offending count per block, detail, block text,
    #        offending-row keys, row filter)
    specs = {
        "block_not_in_units": (
            persons, "geoid", (pl.col("p_rows") > 0) & ~pl.col("in_units"), pl.col("p_rows"),
            "persons in a block that has no housing unit or facility in the units file",
            pl.format("{} persons", pl.col("p_rows")),
            lambda c: blocks_of(c), everyone),
        "gq_without_facility": (
            persons, gq_col, pl.any_horizontal(list(gq_bad.values())),
            pl.sum_horizontal([pl.when(gq_bad[k]).then(g[k]).otherwise(0) for k in ks]),
            "persons in group-quarters type k in a block with no facility of type k (2020 edit constraint)",
            pl.concat_str([pl.when(gq_bad[k]).then(pl.format(f"type {k}: {{}} persons, 0 facilities; ", g[k]))
                           .otherwise(pl.lit("")) for k in ks]),
            lambda c: per_type(gq_bad, "_gq"), everyone),
        "household_without_housing_unit": (
            persons, gq_col, (hh > 0) & (hu == 0) & inu, hh, "household persons in a block with no housing unit",
            pl.format("{} household persons, 0 housing units", hh), lambda c: blocks_of(c), gqc == 0),
        "household_without_occupied_unit": (
            persons, gq_col, (hh > 0) & (hu > 0) & (occ == 0) & inu, hh,
            "household persons in a block whose housing units are all vacant",
            pl.format("{} household persons, {} housing units, 0 occupied", hh, hu), lambda c: blocks_of(c),
            gqc == 0),
        "facility_without_persons": (
            units, "kind", pl.any_horizontal(list(fac_bad.values())),
            pl.sum_horizontal([pl.when(fac_bad[k]).then(f[k] - g[k]).otherwise(0) for k in ks]),
            "more group-quarters facilities of a type than persons in that type (facilities in excess)",
            pl.concat_str([pl.when(fac_bad[k]).then(pl.format(f"type {k}: {{}} facilities, {{}} persons; ", f[k], g[k]))
                           .otherwise(pl.lit("")) for k in ks]),
            lambda c: per_type(fac_bad, "kind"), everyone),
        "occupied_exceeds_household": (
            units, "occupied", (occ > hh) & inu, occ - hh,
            "more occupied housing units than household persons (occupied units in excess)",
            pl.format("{} occupied units, {} household persons", occ, hh), lambda c: blocks_of(c),
            (kind == 0) & pl.col("occ").fill_null(False)),
    }
    specs = {n: v for n, v in specs.items() if enabled.get(n, True)}
    aggs = [pl.col("in_units").sum().alias("blocks"), (pl.col("persons") > 0).sum().alias("person_blocks"),
            hh.sum().alias("household_persons"), pl.sum_horizontal(list(g.values())).sum().alias("gq_persons"),
            hu.sum().alias("housing_units"), occ.sum().alias("occupied_units"),
            pl.sum_horizontal(list(f.values())).sum().alias("gq_facilities")]
    aggs += [pl.when(v[2]).then(v[3]).otherwise(0).sum().alias(n) for n, v in specs.items()]
    res = j.select(aggs).collect(engine="streaming").row(0, named=True)
    problems = []
    for name, (table, column, cond, _, detail, show, keys, row_filter) in specs.items():
        if not res[name]:
            continue
        blocks = (j.filter(cond).sort("geoid").head(MAX_EXAMPLES)
                  .select(pl.format("{}: {}", pl.col("geoid"), show).str.strip_chars_end("; "))
                  .collect(engine="streaming").to_series())
        if table is persons:
            rows = _row_frame(persons, p_checks, {"_gq": persons.target_expr(gq)} if gq is not None else {})
            row_show = (pl.format(f"block {{}} {gq} {{}}", pl.col("geoid"), gqc) if gq is not None
                        else pl.format("block {}", pl.col("geoid")))
        else:
            rows = _row_frame(units, u_checks, {"kind": units.target_expr("kind"),
                                                "occ": units.target_expr("occupied"),
                                                "unit_id": units.target_expr("unit_id")})
            row_show = pl.format("unit {} block {} kind {}", pl.col("unit_id"), pl.col("geoid"), kind)
        found, shown = _offending_rows(rows, keys(cond), row_filter, table, row_show)
        problems.append(Problem(table.label, column, name, int(res[name]), detail, found, shown, tuple(blocks)))
    return problems, {k: int(v) for k, v in res.items() if k not in specs}


def _check_spec(spec: HistogramSpec, contract: dict | None = None) -> None:
    """The contract's normalised persons domains must be the spec's attribute codes."""
    contract = contract if contract is not None else load_contract()
    for lname, layout in contract["persons"]["layouts"].items():
        for target, col in layout["targets"].items():
            cspec = layout["columns"][col]
            recode = {int(k): int(v) for k, v in (cspec.get("recode") or {}).items()}
            if "codes" in cspec:
                raw_codes = [int(c) for c in cspec["codes"]]
            else:
                lo, hi = cspec["range"]
                raw_codes = list(range(lo, hi + 1))
            codes = tuple(sorted({recode.get(c, c) for c in raw_codes}))
            if codes != tuple(sorted(spec.attribute(target).codes)):
                raise SpecError(f"input contract layout {lname!r} column {col!r} gives codes {codes} for "
                                f"{target!r}, but spec {spec.name!r} has {spec.attribute(target).codes}")


def validate_inputs(persons_path: str | Path, units_path: str | Path,
                    spec: HistogramSpec | None = None,
                    on_step: Callable[[str], None] | None = None,
                    lookup: pl.DataFrame | None = None) -> ValidatedInputs:
    """Check both inputs completely; return their normalised lazy frames and a summary.

    ``spec`` (default ``load_spec("pl94")``) supplies the structural zeros and must agree with
    the contract's domains (else :class:`SpecError`). Raises :class:`InputValidationError`
    listing every problem of both files (file, column, kind, count, first rows/values).
    Cross-file checks run on the rows that passed the row checks, whenever both files are
    readable; so one run reports row problems and block problems together. ``on_step`` is
    called with a short description before each pass over the data (for progress display).
    ``lookup``: the checked geography lookup (:func:`pipeline.inputs.lookup.read_lookup`) of a
    lookup-file geography; every unit code of both files must be one of its bottom units.
    """
    step = on_step or (lambda _: None)
    spec = spec if spec is not None else load_spec("pl94")
    contract = contract_for(spec, lookup=lookup is not None)
    _check_spec(spec, contract)
    gq = facility_attribute(spec)
    problems: list[Problem] = []
    tables: dict[str, tuple[PreparedTable | None, list[Check]]] = {}
    for role, path in (("persons", persons_path), ("units", units_path)):
        table, probs = prepare_table(role, path, contract)
        problems += probs
        checks: list[Check] = []
        if table is not None:
            if table.source.n_rows == 0:
                problems.append(Problem(table.label, "", "empty_file", 1, "the table has no rows"))
            checks = row_checks(table, spec)
            dup = "unit_id" if role == "units" and "unit_id" in table.columns else None
            step(f"{role}: checking {table.source.n_rows:,} rows")
            try:
                row_problems = run_row_checks(table, checks, dup)
            except READ_ERRORS as exc:  # corrupt data pages behind a valid footer
                row_problems = [Problem(table.label, "", "corrupt_parquet", 1,
                                        f"rows cannot be read: {first_line(exc)}")]
            problems += row_problems
            geo_cols = table.layout_spec["geoid"]
            if lookup is not None and all(c in table.columns for c in geo_cols):
                try:
                    problems += unknown_units(table.label, geo_cols[0],
                                              table.source.scan().select(table.geoid_expr().alias("geoid")),
                                              lookup, level_columns(lookup.columns)[-1])
                except READ_ERRORS:
                    pass  # reported by the row checks
            # every row passed: the cross-file pass need not re-evaluate the row checks
            checks = checks if any(p.column for p in row_problems) else []
        tables[role] = (table, checks)
    (pt, pc), (ut, uc) = tables["persons"], tables["units"]
    needed_p = (set(pt.layout_spec["geoid"]) | ({pt.layout_spec["targets"][gq]} if gq is not None else set())
                if pt else set())
    usable = (pt is not None and ut is not None and needed_p <= set(pt.columns)
              and {"geoid", "kind", "occupied"} <= set(ut.columns)
              and not any(p.kind == "corrupt_parquet" for p in problems))
    counts: dict[str, int] = {}
    if usable:
        step("persons x units: checking blocks")
        try:
            cross, counts = _cross_checks(pt, pc, ut, uc, gq, lookup is not None)
            problems += cross
        except READ_ERRORS as exc:
            problems.append(Problem(f"{pt.label} + {ut.label}", "", "corrupt_parquet", 1,
                                    f"rows cannot be read: {first_line(exc)}"))
    if problems:
        raise InputValidationError(problems)
    assert pt is not None and ut is not None  # no problems means both tables were prepared
    summary = InputSummary(
        persons_layout=pt.layout, persons_rows=pt.source.n_rows, units_rows=ut.source.n_rows,
        blocks=counts["blocks"], person_blocks=counts["person_blocks"],
        household_persons=counts["household_persons"], gq_persons=counts["gq_persons"],
        housing_units=counts["housing_units"], occupied_units=counts["occupied_units"],
        gq_facilities=counts["gq_facilities"])
    return ValidatedInputs(pt.normalised(), ut.normalised(), summary, Path(persons_path), Path(units_path))
