"""Synthetic, consistent published histograms for the tables/microdata/release tests.

Small random block histograms (persons: sparse 2,016-cell, structural zeros respected;
units: vacant/occupied per block), upper levels by summing children, as post-processing
would publish them. Imported by the other test_tables*/test_release*/test_microdata* files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.inputs.histograms import aggregate_up
from pipeline.model.geography import Geography
from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import load_spec
from pipeline.release.checks import Invariants


@dataclass
class Case:
    geography: Geography
    persons: dict[str, SparseHistogram]
    units: dict[str, np.ndarray]
    invariants: Invariants
    block_dense: np.ndarray


def block_geoids(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Unique 15-digit block GEOIDs in 2 states, a few counties, tracts and block groups."""
    out: set[str] = set()
    counties = ["01105", "01001", "44007"]
    while len(out) < n_blocks:
        c = counties[rng.integers(len(counties))]
        tract = ["686800", "686900", "000101"][rng.integers(3)]
        bg = str(rng.integers(1, 3))
        out.add(f"{c}{tract}{bg}{rng.integers(0, 40):03d}")
    return np.array(sorted(out))


def make_case(seed: int = 0, n_blocks: int = 60, cells_per_block: int = 15) -> Case:
    """A consistent synthetic release input (persons + units per level, invariants)."""
    rng = np.random.default_rng(seed)
    spec = load_spec("pl94")
    geoids = block_geoids(rng, n_blocks)
    geo = Geography.from_block_geoids(geoids)
    allowed = np.nonzero(~spec.structural_zero_mask)[0]
    x = np.zeros((n_blocks, spec.n_cells), dtype=np.int64)
    for b in range(n_blocks):
        if rng.random() < 0.1:
            continue  # some empty blocks
        cells = rng.choice(allowed, size=cells_per_block, replace=False)
        x[b, cells] = rng.integers(1, 6, size=cells_per_block)
    h = SparseHistogram.from_dense("block", x)
    persons = {"block": h}
    for lv in reversed(geo.levels[:-1]):
        h = aggregate_up(h, geo)
        persons[lv.name] = h
    hu = rng.integers(0, 25, size=n_blocks)
    occ = rng.binomial(hu, 0.85)
    ub = np.stack([hu - occ, occ], axis=1).astype(np.int64)
    units = {"block": ub}
    blk = geo.levels[-1]
    cur = ub
    for lv in reversed(geo.levels[:-1]):
        child = geo.level(geo.levels[[l.name for l in geo.levels].index(lv.name) + 1].name)
        up = np.zeros((lv.n_units, 2), dtype=np.int64)
        np.add.at(up, child.parent, cur)
        units[lv.name] = up
        cur = up
    st = geo.level("state")
    state_totals = {str(g): int(t) for g, t in zip(st.geoids, persons["state"].totals())}
    inv = Invariants(state_totals, np.asarray(blk.geoids), hu.astype(np.int64))
    return Case(geo, {lv.name: persons[lv.name] for lv in geo.levels}, units, inv, x)


def test_case_is_consistent() -> None:
    c = make_case(1)
    assert c.persons["nation"].total() == int(c.block_dense.sum()) > 0
    assert int(c.units["nation"].sum()) == int(c.invariants.block_housing_units.sum())
