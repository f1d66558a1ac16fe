"""Synthetic population: realistic hierarchy, skew and sparsity, written in bounded memory.

``synthesize(n_persons, seed, out_dir)`` writes ``out_dir/persons.parquet`` (``geoid`` Utf8,
``hhgq``, ``voting_age``, ``hispanic``, ``cenrace`` Int8) and ``out_dir/units.parquet``
(``unit_id`` Utf8, ``geoid`` Utf8, ``kind`` Int8, ``occupied`` Boolean, null for facilities).

Shape: real 2020 counts of tracts and block groups per county
(``pipeline/schemas/geonames/tracts_bgs_per_county.csv``, shipped); counties are taken state by state (seeded
order, or ``states``) until they hold about ``n_persons / 1380`` block groups, so a small
population is one county or a part of one. Everything else is drawn from the distributions in
:mod:`pipeline.synth_model`. Generation runs county by county, and within a county in batches
of at most ``batch_persons`` persons, each written as Parquet row groups; peak memory does not
grow with ``n_persons`` (331 M persons is one pass over 3,143 counties). Each county draws from
its own generators seeded by ``(seed, county position)``, so the output is a function of
``(n_persons, seed, states, batch_persons)``; ``batch_persons`` (default 1 M) only changes the
draws of person attributes, never the geography, block sizes, GQ placement or units.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.inputs import synth_model as m
from pipeline.model.schemas import SCHEMAS_DIR

COUNTIES_CSV = Path(os.environ.get("DPTAB_COUNTIES_CSV", SCHEMAS_DIR / "geonames" / "tracts_bgs_per_county.csv"))

PERSONS_SCHEMA = pa.schema([("geoid", pa.string()), ("hhgq", pa.int8()), ("voting_age", pa.int8()),
                            ("hispanic", pa.int8()), ("cenrace", pa.int8())])
UNITS_SCHEMA = pa.schema([("unit_id", pa.string()), ("geoid", pa.string()), ("kind", pa.int8()),
                          ("occupied", pa.bool_())])


class SynthError(InputError):
    """Bad arguments to the generator (message says which)."""


@dataclass(frozen=True)
class SynthSummary:
    """What was written: counts of persons, units, GQ persons and geography, and the seconds taken."""

    persons: int
    gq_persons: int
    voting_age: int
    housing_units: int
    occupied: int
    facilities: int
    states: int
    counties: int
    tracts: int
    block_groups: int
    blocks: int
    populated_blocks: int
    seconds: float
    persons_path: Path
    units_path: Path


def plan_counties(n_persons: int, seed: int, states: Sequence[str] | None = None,
                  counties_csv: Path = COUNTIES_CSV) -> pl.DataFrame:
    """Counties to generate: ``state``, ``county`` (Utf8 FIPS), ``n_tracts``, ``n_bg``,
    ``persons`` (Int64, summing to ``n_persons``), in output (GEOID) order.

    Counties are taken in FIPS order within each state, the ``states`` first, then the other
    states in an order drawn from ``seed``, until they hold ``n_persons / 1380`` block groups
    (the last county is cut to fit)."""
    if n_persons < 1:
        raise SynthError(f"n_persons must be >= 1, got {n_persons}")
    df = (pl.read_csv(counties_csv, schema_overrides={"state": pl.Utf8, "county": pl.Utf8})
          .select("state", "county", pl.col("n_tracts_2020").alias("n_tracts"), pl.col("n_bg_2020").alias("n_bg"))
          .filter((pl.col("n_tracts") > 0) & (pl.col("n_bg") > 0)))
    rng = np.random.default_rng([seed, 0])
    all_states = sorted(df["state"].unique().to_list())
    first = list(dict.fromkeys(states or ()))
    # with given states, the order of the others comes from its own stream, so it does not
    # advance ``rng`` (which draws the county weights below)
    order_rng = np.random.default_rng([seed, 0, 1]) if first else rng
    shuffled = [all_states[i] for i in order_rng.permutation(len(all_states))]
    unknown = [s for s in first if s not in all_states]
    if unknown:
        raise SynthError(f"unknown state FIPS code(s) {unknown}; known: {', '.join(all_states)}")
    # the requested states first; if they hold too few block groups, the others in seeded order
    order = first + [s for s in shuffled if s not in first]
    target = max(1, round(n_persons / m.PERSONS_PER_BLOCK_GROUP))
    chosen: list[dict] = []
    have = 0
    for st in order:
        for row in df.filter(pl.col("state") == st).sort("county").iter_rows(named=True):
            if have >= target:
                break
            take = min(row["n_bg"], target - have)
            n_tracts = max(1, min(row["n_tracts"], -(-take * row["n_tracts"] // row["n_bg"])))
            chosen.append({**row, "n_tracts": n_tracts, "n_bg": max(take, n_tracts)})
            have += chosen[-1]["n_bg"]
        if have >= target:
            break
    plan = pl.DataFrame(chosen).sort("state", "county")
    w = plan["n_bg"].to_numpy() * rng.lognormal(0.0, m.COUNTY_WEIGHT_LOGSD, plan.height)
    persons = rng.multinomial(n_persons, w / w.sum())
    return plan.with_columns(pl.Series("persons", persons, dtype=pl.Int64))


@dataclass
class _County:
    """One county's generated structure (all arrays indexed by block unless said otherwise)."""

    geoids: pa.Array  # block GEOIDs (string)
    hh: np.ndarray  # household persons per block
    gq: np.ndarray  # (n_blocks, 7) GQ persons per block and type
    fac_block: np.ndarray  # block of each facility
    fac_kind: np.ndarray  # GQ type 1..7 of each facility
    mix: np.ndarray  # (n_blocks, 8) group mix
    va_offset: np.ndarray  # voting-age rate offset per block
    occupied: np.ndarray  # occupied housing units per block
    vacant: np.ndarray  # vacant housing units per block
    n_tracts: int
    n_bg: int


def _make_county(rng: np.random.Generator, state: str, county: str, n_tracts: int, n_bg: int,
                 n_persons: int) -> _County:
    """Tracts, block groups and blocks of one county; GQ facilities and persons; household
    persons per block; race/ethnicity mix and voting-age offset per block."""
    bg_per_tract = m.split_tracts(rng, n_tracts, n_bg)
    n_bg = int(bg_per_tract.sum())
    tcodes = m.tract_codes(rng, n_tracts)
    tract_of_bg = np.repeat(np.arange(n_tracts), bg_per_tract)
    bg_digit = np.arange(n_bg) - np.repeat(np.cumsum(bg_per_tract) - bg_per_tract, bg_per_tract) + 1
    nb = m.blocks_per_bg(rng, n_bg)
    n_blocks = int(nb.sum())
    bg_of_block = np.repeat(np.arange(n_bg), nb)
    seq = np.arange(n_blocks) - np.repeat(np.cumsum(nb) - nb, nb)
    block_code = (tcodes[tract_of_bg[bg_of_block]] * 10_000 + bg_digit[bg_of_block] * 1000 + seq)
    prefix = int(state) * 10**13 + int(county) * 10**10
    geoids = pl.Series(prefix + block_code, dtype=pl.Int64).cast(pl.Utf8).str.zfill(15).to_arrow()

    # group quarters: persons by type, a few facilities per type, each in one block
    n_gq = int(rng.binomial(n_persons, m.GQ_SHARE))
    gq_by_type = rng.multinomial(n_gq, m.GQ_TYPE_SHARES)
    gq = np.zeros((n_blocks, 7), dtype=np.int64)
    fac_block, fac_kind = [], []
    for t in range(7):
        c = int(gq_by_type[t])
        if c == 0:
            continue
        k = int(min(max(1, round(c / m.GQ_FACILITY_SIZE[t])), c, n_blocks))
        where = rng.choice(n_blocks, size=k, replace=False)
        size = 1 + rng.multinomial(c - k, rng.dirichlet(np.full(k, 2.0)))
        np.add.at(gq[:, t], where, size)
        fac_block.append(where)
        fac_kind.append(np.full(k, t + 1))
    # household persons: block-group weights times heavy-tailed block weights; some blocks empty
    bg_w = rng.lognormal(0.0, m.BG_WEIGHT_LOGSD, n_bg)
    blk_w = rng.lognormal(0.0, m.BLOCK_WEIGHT_LOGSD, n_blocks) * (rng.random(n_blocks) < m.BLOCK_POPULATED)
    bg_sum = np.bincount(bg_of_block, weights=blk_w, minlength=n_bg)
    dead = np.flatnonzero(bg_sum == 0)  # every block group keeps one populated block
    blk_w[np.searchsorted(bg_of_block, dead)] = 1.0
    bg_sum[dead] = 1.0
    p = bg_w[bg_of_block] * blk_w / bg_sum[bg_of_block]
    hh = rng.multinomial(n_persons - n_gq, p / p.sum()).astype(np.int64)

    nation = m.GROUP_SHARES[None, :]
    cmix = m.nested_mix(rng, nation, m.CONCENTRATION["county"])
    tmix = m.nested_mix(rng, np.repeat(cmix, n_tracts, axis=0), m.CONCENTRATION["tract"])
    bmix = m.nested_mix(rng, tmix[tract_of_bg[bg_of_block]], m.CONCENTRATION["block"])
    va_offset = rng.normal(0.0, m.VOTING_AGE_BLOCK_SD, n_blocks)
    fb = np.concatenate(fac_block) if fac_block else np.zeros(0, np.int64)
    fk = np.concatenate(fac_kind) if fac_kind else np.zeros(0, np.int64)
    # housing units: occupied ≈ household persons / 2.1–3.0 (at least 1 where anyone lives,
    # never more than the persons), ~11% extra vacant; a few empty blocks have vacant units only
    occ = np.where(hh > 0, np.clip(np.rint(hh / rng.uniform(2.1, 3.0, n_blocks)), 1, hh), 0).astype(np.int64)
    vacant = rng.binomial(occ, m.VACANT_SHARE).astype(np.int64)
    empty = hh == 0
    vacant[empty] = ((rng.random(int(empty.sum())) < m.EMPTY_BLOCK_WITH_HOUSING)
                     * (1 + rng.poisson(1.0, int(empty.sum()))))
    return _County(geoids, hh, gq, fb.astype(np.int64), fk.astype(np.int64), bmix,
                   va_offset, occ, vacant, n_tracts, n_bg)


def _persons_batch(rng: np.random.Generator, c: _County, lo: int, hi: int) -> pa.Table:
    """Person rows of blocks ``lo:hi``: household persons then GQ persons of each block."""
    hh = c.hh[lo:hi]
    gq = c.gq[lo:hi]
    counts = np.concatenate([hh[:, None], gq], axis=1)  # (b, 8) persons by hhgq
    blk, hhgq = np.nonzero(counts)
    by_group = rng.multinomial(counts[blk, hhgq], c.mix[lo + blk])  # (r, 8)
    r, group = np.nonzero(by_group)
    n = by_group[r, group]
    block = np.repeat(blk[r] + lo, n)
    hhgq_p = np.repeat(hhgq[r], n)
    group_p = np.repeat(group, n)
    rate = np.where(hhgq_p == 0,
                    np.clip(m.GROUP_VOTING_AGE[group_p] + c.va_offset[block], 0.05, 0.98),
                    m.GQ_VOTING_AGE[np.maximum(hhgq_p - 1, 0)])
    voting_age = (rng.random(block.size) < rate).astype(np.int8)
    cenrace = np.zeros(block.size, dtype=np.int8)
    for g in range(len(m.GROUPS)):
        sel = np.flatnonzero(group_p == g)
        if sel.size:
            cenrace[sel] = rng.choice(63, size=sel.size, p=m.CENRACE_P[g]) + 1
    return pa.table({
        "geoid": c.geoids.take(pa.array(block)),
        "hhgq": pa.array(hhgq_p.astype(np.int8)),
        "voting_age": pa.array(voting_age),
        "hispanic": pa.array((group_p == 0).astype(np.int8)),
        "cenrace": pa.array(cenrace),
    }, schema=PERSONS_SCHEMA)


def _units_table(c: _County, lo: int, hi: int) -> pa.Table:
    """Unit rows of blocks ``lo:hi`` in GEOID order: per block its occupied housing units, its
    vacant ones, then one row per GQ facility; ``unit_id`` = GEOID + '-' + 5-digit sequence."""
    occ, vacant = c.occupied[lo:hi], c.vacant[lo:hi]
    nb = hi - lo
    in_range = (c.fac_block >= lo) & (c.fac_block < hi)
    fac_order = np.flatnonzero(in_range)[np.argsort(c.fac_block[in_range], kind="stable")]
    fac_block = c.fac_block[fac_order] - lo
    n_fac = np.bincount(fac_block, minlength=nb)
    per_block = occ + vacant + n_fac
    hu_block = np.repeat(np.arange(nb), occ + vacant)
    hu_occ = np.repeat(np.tile([True, False], nb), np.stack([occ, vacant], axis=1).reshape(-1))
    block = np.concatenate([hu_block, fac_block])
    kind = np.concatenate([np.zeros(hu_block.size, np.int8), c.fac_kind[fac_order].astype(np.int8)])
    is_fac = np.concatenate([np.zeros(hu_block.size, bool), np.ones(fac_block.size, bool)])
    srt = np.argsort(block, kind="stable")  # GEOID order, housing units before facilities
    block, kind, is_fac = block[srt], kind[srt], is_fac[srt]
    occupied = pa.array(np.concatenate([hu_occ, np.zeros(fac_block.size, bool)])[srt], mask=is_fac)
    seq = np.arange(block.size) - np.repeat(np.cumsum(per_block) - per_block, per_block)
    geoid = c.geoids.take(pa.array(block + lo))
    ids = (pl.DataFrame({"g": pl.Series(geoid), "s": seq})
           .select(pl.concat_str([pl.col("g"), pl.lit("-"), pl.col("s").cast(pl.Utf8).str.zfill(5)]))
           .to_series().to_arrow())
    return pa.table({"unit_id": ids.cast(pa.string()), "geoid": geoid, "kind": pa.array(kind),
                     "occupied": occupied}, schema=UNITS_SCHEMA)


def _batches(c: _County, batch_persons: int) -> list[tuple[int, int]]:
    """Block ranges whose persons add up to at most ``batch_persons`` (a bigger block is alone)."""
    per = c.hh + c.gq.sum(axis=1)
    cum = np.cumsum(per)
    bounds = [0]
    while bounds[-1] < per.size:
        base = cum[bounds[-1] - 1] if bounds[-1] else 0
        nxt = int(np.searchsorted(cum, base + batch_persons, side="right"))
        bounds.append(max(nxt, bounds[-1] + 1))
    return list(zip(bounds[:-1], bounds[1:]))


def synthesize(n_persons: int, seed: int, out_dir: str | Path, states: Sequence[str] | None = None,
               batch_persons: int = 1_000_000,
               progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Generate ``n_persons`` persons and their units into ``out_dir`` (created if missing).

    Files are written under temporary names and renamed at the end, so a crash never leaves
    a truncated ``persons.parquet``. ``progress(done_persons, n_persons)`` is called after each
    batch. Deterministic for ``(n_persons, seed, states, batch_persons)``; ``batch_persons``
    bounds memory (about 40 bytes per person of a batch) and seeds the attribute draws per batch.
    """
    t0 = time.perf_counter()
    if batch_persons < 1:
        raise SynthError(f"batch_persons must be >= 1, got {batch_persons}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SynthError(f"cannot create output directory {out}: {exc.strerror or exc}") from exc
    plan = plan_counties(n_persons, seed, states)
    paths = {"persons": out / "persons.parquet", "units": out / "units.parquet"}
    tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in paths.items()}
    stats = dict.fromkeys(("gq", "va", "hu", "occ", "fac", "tracts", "bgs", "blocks", "populated"), 0)
    done = 0
    try:
        with pq.ParquetWriter(tmp["persons"], PERSONS_SCHEMA, compression="zstd") as pw, \
                pq.ParquetWriter(tmp["units"], UNITS_SCHEMA, compression="zstd") as uw:
            for i, row in enumerate(plan.iter_rows(named=True)):
                rng = np.random.default_rng([seed, 1, i])
                c = _make_county(rng, row["state"], row["county"], row["n_tracts"], row["n_bg"], row["persons"])
                for lo, hi in _batches(c, batch_persons):
                    brng = np.random.default_rng([seed, 2, i, lo])
                    t = _persons_batch(brng, c, lo, hi)
                    if t.num_rows:
                        pw.write_table(t)
                        stats["va"] += int(np.asarray(t.column("voting_age")).sum())
                    done += t.num_rows
                    units = _units_table(c, lo, hi)
                    if units.num_rows:
                        uw.write_table(units)
                    if progress is not None:
                        progress(done, n_persons)
                hu = c.hh > 0
                stats["gq"] += int(c.gq.sum())
                stats["hu"] += int(c.occupied.sum() + c.vacant.sum())
                stats["occ"] += int(c.occupied.sum())
                stats["fac"] += int(c.fac_block.size)
                stats["tracts"] += c.n_tracts
                stats["bgs"] += c.n_bg
                stats["blocks"] += int(c.hh.size)
                stats["populated"] += int((hu | (c.gq.sum(axis=1) > 0)).sum())
        for k in paths:
            os.replace(tmp[k], paths[k])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return SynthSummary(
        persons=done, gq_persons=stats["gq"], voting_age=stats["va"], housing_units=stats["hu"],
        occupied=stats["occ"], facilities=stats["fac"], states=plan["state"].n_unique(),
        counties=plan.height, tracts=stats["tracts"], block_groups=stats["bgs"], blocks=stats["blocks"],
        populated_blocks=stats["populated"], seconds=time.perf_counter() - t0,
        persons_path=paths["persons"], units_path=paths["units"])


def units_from_persons(persons: pl.LazyFrame | pl.DataFrame, persons_per_unit: float = 2.5,
                       vacant_share: float = 0.12) -> pl.DataFrame:
    """A plausible, deterministic units table for persons microdata that has none (e.g. PPMF).

    Rule, per block: occupied housing units = ceil(household persons / ``persons_per_unit``)
    (so at least one where anyone lives, never more than the household persons), vacant units
    = round(occupied × ``vacant_share`` / (1 − ``vacant_share``)) so that about
    ``vacant_share`` of housing units are vacant, and one GQ facility per GQ type present.
    ``persons`` is normalised (``geoid``, ``hhgq``). Returns ``unit_id``, ``geoid``, ``kind``
    (Int8), ``occupied`` (null for facilities), sorted by ``unit_id``. Synthetic: not census data.
    """
    if persons_per_unit < 1 or not 0 <= vacant_share < 1:
        raise SynthError("persons_per_unit must be >= 1 and vacant_share in [0, 1)")
    by = (persons.lazy().group_by("geoid", pl.col("hhgq").cast(pl.Int8)).agg(pl.len().alias("n"))
          .collect().sort("geoid", "hhgq"))
    hh = by.filter(pl.col("hhgq") == 0)
    occ = np.ceil(hh["n"].to_numpy() / persons_per_unit).astype(np.int64)
    vac = np.rint(occ * vacant_share / (1 - vacant_share)).astype(np.int64)
    hu = pl.DataFrame({
        "geoid": np.repeat(hh["geoid"].to_numpy(), occ + vac),
        "kind": pl.Series(np.zeros(int((occ + vac).sum())), dtype=pl.Int8),
        "occupied": np.repeat(np.tile([True, False], occ.size), np.stack([occ, vac], axis=1).reshape(-1)),
    })
    fac = by.filter(pl.col("hhgq") > 0).select("geoid", pl.col("hhgq").alias("kind"),
                                                  pl.lit(None, dtype=pl.Boolean).alias("occupied"))
    units = pl.concat([hu, fac]).sort("geoid", "kind", maintain_order=True)
    seq = pl.int_range(pl.len()).over("geoid").cast(pl.Utf8).str.zfill(5)
    return units.select(pl.concat_str([pl.col("geoid"), pl.lit("-"), seq]).alias("unit_id"), "geoid", "kind", "occupied")
