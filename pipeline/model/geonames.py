"""Readable names of geographic units for published tables (``schemas/geonames/``).

States and counties are named from the Census FIPS files copied into ``schemas/geonames/``
(see its README for attribution); tracts, block groups and blocks from their codes, in the
Census style ("Census Tract 6868", "Block Group 1", "Block 1000").
"""

from __future__ import annotations

import csv
from functools import lru_cache

import numpy as np

from pipeline.model.schemas import SCHEMAS_DIR

GEONAMES_DIR = SCHEMAS_DIR / "geonames"


@lru_cache(maxsize=1)
def _name_maps() -> tuple[dict[str, str], dict[str, str]]:
    with open(GEONAMES_DIR / "states_fips.csv", newline="") as fh:
        states = {r["state"]: r["name"] for r in csv.DictReader(fh)}
    with open(GEONAMES_DIR / "county_fips_2020.csv", newline="") as fh:
        counties = {r["state"] + r["county"]: r["name"] for r in csv.DictReader(fh)}
    return states, counties


def _tract_name(code: str) -> str:
    base, suffix = code[:4].lstrip("0") or "0", code[4:]
    return f"Census Tract {base}" if suffix == "00" else f"Census Tract {base}.{suffix}"


def unit_names(level: str, geoids: np.ndarray, lookup: bool = False) -> np.ndarray:
    """Readable names of a level's units, ``(n_units,)`` object array.

    Nation "United States"; states and counties by FIPS ("Perry County, Alabama"; unknown codes
    "State 99", "County 999"); "Census Tract 6868" (or "6868.01"), "Block Group 1", "Block 1000".
    Units of a lookup geography (``lookup``), and of any other level: "<level> <code>".
    """
    g = [str(x) for x in np.asarray(geoids).tolist()]
    if lookup:
        return np.array([f"{level} {x}" for x in g], dtype=object)
    states, counties = _name_maps()
    if level == "nation":
        return np.array(["United States"] * len(g), dtype=object)
    if level == "state":
        return np.array([states.get(x, f"State {x}") for x in g], dtype=object)
    if level == "county":
        return np.array([f"{counties.get(x, 'County ' + x[2:])}, {states.get(x[:2], 'State ' + x[:2])}" for x in g],
                        dtype=object)
    if level == "tract":
        return np.array([_tract_name(x[5:11]) for x in g], dtype=object)
    if level == "block_group":
        return np.array([f"Block Group {x[11:12]}" for x in g], dtype=object)
    if level == "block":
        return np.array([f"Block {x[11:15]}" for x in g], dtype=object)
    return np.array([f"{level} {x}" for x in g], dtype=object)
