"""The input contract (``schemas/input_contract.yaml``) applied to an opened Parquet table.

Resolves which layout a persons or units file uses (ours or PPMF), checks each contract
column's dtype, and builds the lazy expressions that parse raw columns (zero-padding integer
GEOID components, parsing integer text, applying recodes) into the normalised columns of
``docs/contracts.md``. Reads no rows: row values are checked in :mod:`pipeline.validation`,
which reuses the same parsed-column expressions, so checks and normalisation cannot drift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.inputs.parquet import ParquetSource, open_parquet
from pipeline.inputs.problems import Problem
from pipeline.model.schemas import SCHEMAS_DIR, parse_yaml
from pipeline.model.spec import HistogramSpec

CONTRACT_PATH = SCHEMAS_DIR / "input_contract.yaml"


@lru_cache(maxsize=4)
def load_contract(path: str | Path = CONTRACT_PATH) -> dict[str, Any]:
    """The input contract as a dict (see ``schemas/input_contract.yaml``).

    Raises ``ValueError`` if a layout's GEOID components do not add up to ``geoid_width``.
    """
    contract = parse_yaml(Path(path).read_text())
    for role in ("persons", "units"):
        for name, layout in contract[role]["layouts"].items():
            widths = [layout["columns"][c]["width"] for c in layout["geoid"]]
            if sum(widths) != contract["geoid_width"]:
                raise ValueError(f"{path}: {role} layout {name!r} GEOID components {layout['geoid']} have "
                                 f"widths {widths}, not adding up to geoid_width {contract['geoid_width']}")
    return contract


def _fits_contract(contract: dict[str, Any], spec: HistogramSpec) -> bool:
    """True when the contract's persons layouts normalise to exactly the spec's attributes (the
    shipped contract and the pl94 spec); otherwise the persons layout is derived from the spec."""
    names = {a.name for a in spec.attributes}
    return all(set(layout["targets"]) == names for layout in contract["persons"]["layouts"].values())


def contract_for(spec: HistogramSpec | None = None, lookup: bool = False) -> dict[str, Any]:
    """The input contract of a run: the shipped contract when the spec is the one it was written
    for (pl94) and the geography is digit prefixes; otherwise a copy where

    - a spec with other attributes gets one persons layout, ``dptab``: a unit column ``geoid``
      and one integer column per spec attribute, named like it, whose values are the
      attribute's codes;
    - with a lookup geography (``lookup``) the unit column of every layout is a ``code`` (any
      non-empty text, checked against the lookup by the validation), and layouts that build
      the GEOID from digit components (PPMF) are dropped.
    """
    base = load_contract()
    fits = spec is None or _fits_contract(base, spec)
    if fits and not lookup:
        return base
    c = copy.deepcopy(base)
    if not fits:
        assert spec is not None
        cols: dict[str, Any] = {"geoid": dict(c["persons"]["layouts"]["dptab"]["columns"]["geoid"])}
        for a in spec.attributes:
            cols[a.name] = {"type": "integer", "codes": list(a.codes)}
        c["persons"]["layouts"] = {"dptab": {"columns": cols, "geoid": ["geoid"],
                                             "targets": {a.name: a.name for a in spec.attributes}, "tolerated": []}}
    if lookup:
        for role in ("persons", "units"):
            layouts = {n: lay for n, lay in c[role]["layouts"].items() if len(lay["geoid"]) == 1}
            for lay in layouts.values():
                lay["columns"][lay["geoid"][0]] = {"type": "code"}
            c[role]["layouts"] = layouts
    return c


def _category(dtype: pl.DataType) -> str:
    """Coarse dtype class: integer, string, boolean, null or other."""
    if dtype.is_integer():
        return "integer"
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "string"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype == pl.Null:
        return "null"
    return "other"


_ACCEPTED = {
    "digits": {"string", "null"},
    "digits+int": {"string", "integer", "null"},
    "integer": {"integer", "string", "null"},
    "boolean": {"boolean", "integer", "null"},
    "id": {"string", "integer", "null"},
    "code": {"string", "integer", "null"},
}


@dataclass(frozen=True)
class ColumnPlan:
    """One contract column as found in a file: its spec and the dtype class it arrived in."""

    name: str
    spec: dict[str, Any]
    category: str

    @property
    def raw(self) -> pl.Expr:
        c = pl.col(self.name)
        return c.cast(pl.String) if self.category == "string" else c

    def parsed(self) -> pl.Expr:
        """Value as the contract type (null where unparsable); digits -> zero-padded text."""
        t, c = self.spec["type"], self.raw
        if self.category == "null":
            return pl.lit(None, dtype={"integer": pl.Int64, "boolean": pl.Boolean}.get(t, pl.String))
        if t == "digits":
            return c.cast(pl.String).str.zfill(self.spec["width"]) if self.category == "integer" else c
        if t == "integer":
            return c.str.to_integer(strict=False) if self.category == "string" else c
        if t == "boolean":
            return (c == 1) if self.category == "integer" else c
        return c.cast(pl.String)  # id, code


@dataclass(frozen=True)
class PreparedTable:
    """An opened input table with its resolved layout and per-column plans."""

    role: str  # "persons" or "units"
    source: ParquetSource
    layout: str
    layout_spec: dict[str, Any] = field(repr=False)
    columns: dict[str, ColumnPlan] = field(repr=False)

    @property
    def label(self) -> str:
        return str(self.source.path)

    def geoid_expr(self) -> pl.Expr:
        """The bottom unit's code: the 15-digit block GEOID (concatenated components in the PPMF
        layout), or a lookup geography's code."""
        parts = [self.columns[c].parsed() for c in self.layout_spec["geoid"]]
        return parts[0] if len(parts) == 1 else pl.concat_str(parts)

    def target_expr(self, target: str) -> pl.Expr:
        """A normalised attribute (Int32 codes after any recode; Utf8 ids; Boolean flags)."""
        plan = self.columns[self.layout_spec["targets"][target]]
        p = plan.parsed()
        t = plan.spec["type"]
        if t == "integer":
            recode = plan.spec.get("recode")
            if recode:
                return p.replace_strict({int(k): int(v) for k, v in recode.items()},
                                        default=None, return_dtype=pl.Int32).alias(target)
            return p.cast(pl.Int32, strict=False).alias(target)
        if t == "boolean":
            return p.cast(pl.Boolean).alias(target)
        return p.cast(pl.String).alias(target)

    def normalised(self) -> pl.LazyFrame:
        """The lazy normalised frame (``docs/contracts.md``); assumes values were validated."""
        targets = list(self.layout_spec["targets"])
        order = ["geoid"] + targets if self.role == "persons" else ["unit_id", "geoid", "kind", "occupied"]
        exprs = {"geoid": self.geoid_expr().alias("geoid")}
        exprs.update({t: self.target_expr(t) for t in targets})
        return self.source.scan().select([exprs[c] for c in order])


def _resolve_layout(role: str, source: ParquetSource,
                    contract: dict[str, Any]) -> tuple[str | None, list[Problem]]:
    layouts = contract[role]["layouts"]
    cols = set(source.schema)
    hits = {name: sorted(cols & set(spec["columns"])) for name, spec in layouts.items()}
    present = [n for n, h in hits.items() if h]
    label = str(source.path)
    if len(layouts) == 1:
        present = list(layouts)
    if len(present) > 1:
        detail = "columns of more than one layout: " + "; ".join(f"{n}: {', '.join(hits[n])}" for n in present)
        return None, [Problem(label, "", "ambiguous_layout", 1, detail)]
    if not present:
        detail = "none of the layouts' columns found (have: " + ", ".join(sorted(cols)) + "); expected " + \
            " or ".join(f"{n} ({', '.join(s['columns'])})" for n, s in layouts.items())
        return None, [Problem(label, "", "missing_column", 1, detail)]
    name = present[0]
    missing = [c for c in layouts[name]["columns"] if c not in cols]
    return name, [Problem(label, c, "missing_column", 1, f"required column of the {name} layout is absent")
                  for c in missing]


def prepare_table(role: str, path: str | Path,
                  contract: dict[str, Any] | None = None) -> tuple[PreparedTable | None, list[Problem]]:
    """Open ``path`` as the ``role`` table ("persons" or "units") and plan its columns.

    Checks the file(s), the layout and each contract column's dtype; reads no rows.
    ``contract``: the run's contract (:func:`contract_for`; default the shipped one).
    """
    contract = contract if contract is not None else load_contract()
    source, problems = open_parquet(path)
    if source is None:
        return None, problems
    layout, problems = _resolve_layout(role, source, contract)
    if layout is None:
        return None, problems
    spec = contract[role]["layouts"][layout]
    plans: dict[str, ColumnPlan] = {}
    for name, cspec in spec["columns"].items():
        if name not in source.schema:
            continue
        dtype = source.schema[name]
        cat = _category(dtype)
        key = "digits+int" if cspec["type"] == "digits" and cspec.get("integers") else cspec["type"]
        if cat not in _ACCEPTED[key]:
            want = {"digits": "a string of digits", "digits+int": "a string of digits or an integer",
                    "integer": "an integer (or integer text)", "boolean": "a boolean (or 0/1 integer)",
                    "id": "a string or integer", "code": "a text code (or an integer)"}[key]
            if cspec["type"] == "digits" and cat == "integer":
                want += " (a 15-digit GEOID as an integer loses its leading zeros)"
            problems.append(Problem(str(source.path), name, "wrong_type", source.n_rows,
                                    f"column has type {dtype}, expected {want}"))
            continue
        plans[name] = ColumnPlan(name, cspec, cat)
    return PreparedTable(role, source, layout, spec, plans), problems
