"""Synthetic inputs for any spec: persons with one column per spec attribute, and a country.

:func:`synthesize_spec` writes ``persons.parquet`` (``geoid`` + one Int16 column per attribute
of the spec, codes drawn from skewed seeded distributions, never in a structural zero) and
``units.parquet`` (housing units / dwellings: ``unit_id, geoid, kind = 0, occupied``). The units
are placed either

- on US blocks: the geography, block sizes and units of :func:`pipeline.inputs.synth.synthesize`
  (its group-quarters facilities are dropped: a spec without households and group quarters
  has no use for them), with the persons re-drawn for the spec (``dptab synth --spec dhc_p12``);
- or on the bottom units of a lookup file (``lookup``), e.g. one written by
  :func:`synth_country`.

:func:`synth_country` writes ``areas.csv``: a synthetic country, four levels
(``country > region > district > area``) with string codes; area codes (``E00000001``, …) are
numbered in a shuffled order, so they do not sort with their parents — as in real lookup files;
the country, regions and districts have names (``<level>_name`` columns), the areas only codes.
Every output is a function of its arguments and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from pipeline.model.spec import HistogramSpec

LOOKUP_LEVELS = ("country", "region", "district", "area")


def synth_country(out: str | Path, seed: int, regions: int = 3, districts: int = 4, areas: int = 5,
                  code: str = "RU") -> Path:
    """Write ``out`` (CSV): one row per area with its country, region and district codes."""
    rng = np.random.default_rng([seed, 7])
    rows = []
    region_names = ["North", "South", "East", "West", "Centre", "Coast", "Hills", "Lakes", "Plains"]
    n_areas = regions * districts * areas
    numbers = rng.permutation(n_areas) + 1
    k = 0
    for r in range(regions):
        reg = f"{code}-{chr(ord('A') + r)}"
        reg_name = region_names[r] if r < len(region_names) else f"Region {r + 1}"
        for d in range(districts):
            dist = f"{code}{r + 1:02d}{d + 1:02d}"
            for _ in range(areas):
                rows.append((code, reg, dist, f"E{int(numbers[k]):08d}", "Ruritania", reg_name,
                             f"{reg_name} District {d + 1}"))
                k += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = list(LOOKUP_LEVELS) + ["country_name", "region_name", "district_name"]
    pl.DataFrame(rows, schema=schema, orient="row").write_csv(out)
    return out


def _cell_probabilities(spec: HistogramSpec, rng: np.random.Generator) -> np.ndarray:
    """A skewed joint distribution over the cells: a product of Dirichlet marginals, structural
    zeros removed."""
    p = np.ones(1)
    for a in spec.attributes:
        m = rng.dirichlet(np.full(a.size, 2.0))
        p = np.multiply.outer(p, m).reshape(-1)
    p = p.reshape(-1)
    p[spec.structural_zero_mask] = 0.0
    return p / p.sum()


def synth_persons(spec: HistogramSpec, unit_sizes: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Persons for ``unit_sizes`` (``geoid``, ``persons``): ``geoid`` + one Int16 column per spec
    attribute (data codes), each unit leaning to its own mix of cells."""
    rng = np.random.default_rng([seed, 11])
    base = _cell_probabilities(spec, rng)
    sizes = unit_sizes["persons"].to_numpy().astype(np.int64)
    geoids = unit_sizes["geoid"].to_numpy().astype(str)
    cells = np.empty(int(sizes.sum()), dtype=np.int64)
    pos = 0
    for n in sizes:
        if n:
            p = rng.dirichlet(base * 50.0 + 1e-9)  # a unit's own mix around the common one
            p[spec.structural_zero_mask] = 0.0
            cells[pos:pos + n] = rng.choice(spec.n_cells, size=int(n), p=p / p.sum())
            pos += int(n)
    codes = spec.cell_codes(cells)
    cols = {"geoid": pl.Series("geoid", np.repeat(geoids, sizes), dtype=pl.Utf8)}
    for a in spec.attributes:
        cols[a.name] = pl.Series(a.name, codes[a.name], dtype=pl.Int16)
    return pl.DataFrame(cols)


def synth_dwellings(unit_sizes: pl.DataFrame, seed: int, persons_per_unit: float = 2.5) -> pl.DataFrame:
    """Housing units for ``unit_sizes``: about ``persons / persons_per_unit`` occupied units per
    area (at least one where anyone lives) and some vacant ones (``kind`` 0)."""
    rng = np.random.default_rng([seed, 13])
    rows_g, rows_occ = [], []
    for g, n in zip(unit_sizes["geoid"].to_list(), unit_sizes["persons"].to_list()):
        occ = min(int(n), max(1, int(round(n / persons_per_unit)))) if n else 0
        vac = int(rng.poisson(0.1 * occ + (0.5 if n else 0.0)))
        rows_g += [g] * (occ + vac)
        rows_occ += [True] * occ + [False] * vac
    ids = [f"{g}-{i}" for i, g in enumerate(rows_g)]
    return pl.DataFrame({"unit_id": pl.Series(ids, dtype=pl.Utf8), "geoid": pl.Series(rows_g, dtype=pl.Utf8),
                         "kind": pl.Series([0] * len(ids), dtype=pl.Int8),
                         "occupied": pl.Series(rows_occ, dtype=pl.Boolean)})


def _sizes(codes: Sequence[str], n_persons: int, rng: np.random.Generator, empty: float) -> pl.DataFrame:
    """Persons per unit: log-normal shares, a fraction ``empty`` of the units left empty."""
    w = rng.lognormal(0.0, 0.8, len(codes))
    w[rng.random(len(codes)) < empty] = 0.0
    if w.sum() == 0:
        w[0] = 1.0
    sizes = rng.multinomial(n_persons, w / w.sum())
    return pl.DataFrame({"geoid": pl.Series(list(codes), dtype=pl.Utf8), "persons": sizes.astype(np.int64)})


def synthesize_spec(spec: HistogramSpec, n_persons: int, seed: int, out_dir: str | Path,
                    lookup: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/persons.parquet`` and ``out_dir/units.parquet`` for ``spec`` (module doc);
    returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])
    if lookup is not None:
        from pipeline.inputs.lookup import level_columns, read_lookup

        raw = pl.read_csv(lookup, infer_schema=False) if str(lookup).lower().endswith(".csv") else pl.read_parquet(lookup)
        table = read_lookup(lookup, level_columns(raw.columns))
        bottom = level_columns(raw.columns)[-1]
        sizes = _sizes(table[bottom].to_list(), n_persons, rng, empty=0.1)
        units = synth_dwellings(sizes, seed)
    else:
        import tempfile

        from pipeline.inputs.synth import synthesize

        with tempfile.TemporaryDirectory() as tmp:
            s = synthesize(n_persons, seed, tmp)
            base = pl.read_parquet(s.persons_path)
            all_units = pl.read_parquet(s.units_path)
        sizes = base.group_by("geoid").agg(pl.len().cast(pl.Int64).alias("persons")).sort("geoid")
        units = all_units.filter(pl.col("kind") == 0)
        # every populated block keeps a housing unit (the GQ-only blocks get an occupied one)
        # (sorted: a join's output order is not guaranteed, and the units file must be reproducible)
        need = sizes.join(units.select("geoid").unique(), on="geoid", how="anti").sort("geoid")
        if need.height:
            units = pl.concat([units, pl.DataFrame({
                "unit_id": pl.Series([f"{g}-hu" for g in need["geoid"]], dtype=pl.Utf8),
                "geoid": need["geoid"], "kind": pl.Series([0] * need.height, dtype=units["kind"].dtype),
                "occupied": pl.Series([True] * need.height, dtype=pl.Boolean)})])
    persons = synth_persons(spec, sizes, seed)
    pp, up = out / "persons.parquet", out / "units.parquet"
    persons.write_parquet(pp)
    units.write_parquet(up)
    return pp, up
