"""Benchmark: tables + checks + margins of error + microdata + release folder + verify.

    python benchmarks/release.py --persons 1000000 [--repeats 3] [--quick]

Builds consistent synthetic *published* histograms (one state, ~25 persons per block, skewed
cell distribution), then times each stage and the whole ``write_release`` (median of the
repeats), against an I/O floor measured in the same run: writing the same long tables as
Parquet and CSV and the same microdata as Parquet with polars, from frames already in memory.
``write_release`` runs with ``workers=1`` and ``workers=2`` alternately (from
``pipeline.release.writer.BACKGROUND_MIN_BLOCKS`` blocks on, the second writes the microdata and
checks the data files in processes of their own), with the CPU utilisation of the process tree.
Prints a table and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import TreeCPU, median_time  # noqa: E402
from pipeline.inputs.histograms import aggregate_up  # noqa: E402
from pipeline.model.geography import Geography  # noqa: E402
from pipeline.model.histogram import SparseHistogram
from pipeline.model.spec import load_spec  # noqa: E402
from pipeline.model.strategy import load_strategy  # noqa: E402
from pipeline.release.checks import Invariants, run_checks  # noqa: E402
from pipeline.release.manifest import ReleaseMetadata, privacy_parameters, variances_from_privacy
from pipeline.release.microdata import microdata_from_blocks  # noqa: E402
from pipeline.release.tables import load_tables, long_frame, tabulate_levels, unit_names  # noqa: E402
from pipeline.release.uncertainty import release_moe90  # noqa: E402
from pipeline.release.verify import verify_release  # noqa: E402
from pipeline.release.writer import write_release  # noqa: E402


def synthetic(persons: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = load_spec("pl94")
    n_blocks = max(persons // 25, 10)
    # one state; ~1000 blocks per county, ~60 per tract, ~25 per block group
    b = np.arange(n_blocks)
    county, tract, bg = b // 1000, b // 60, b // 25
    codes = (44 * 10**13 + (county * 2 + 1) * 10**10 + (tract + 100) * 10**4 + (bg % 9 + 1) * 10**3 + b % 1000)
    geo = Geography.from_block_codes(codes)
    allowed = np.nonzero(~spec.structural_zero_mask)[0]
    w = rng.pareto(1.2, allowed.size) + 1e-3
    w /= w.sum()
    block = rng.integers(0, geo.blocks.n_units, persons)
    cell = rng.choice(allowed, size=persons, p=w)
    key, cnt = np.unique(block * spec.n_cells + cell, return_counts=True)
    h = SparseHistogram("block", geo.blocks.n_units, spec.n_cells, key // spec.n_cells, key % spec.n_cells,
                        cnt.astype(np.int64))
    hists = {"block": h}
    for lv in reversed(geo.levels[:-1]):
        h = aggregate_up(h, geo)
        hists[lv.name] = h
    hu = rng.integers(0, 30, geo.blocks.n_units)
    occ = rng.binomial(hu, 0.88)
    units = {"block": np.stack([hu - occ, occ], axis=1).astype(np.int64)}
    cur = units["block"]
    names = [lv.name for lv in geo.levels]
    for i in range(len(names) - 2, -1, -1):
        up = np.zeros((geo.levels[i].n_units, 2), np.int64)
        np.add.at(up, geo.level(names[i + 1]).parent, cur)
        units[names[i]] = cur = up
    inv = Invariants({"44": int(hists["state"].total())}, geo.blocks.geoids, hu.astype(np.int64))
    return geo, hists, units, inv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200k persons, 3 repeats")
    ap.add_argument("--no-csv", action="store_true", help="write_release without csv/ (as the national runs)")
    a = ap.parse_args()
    persons = 200_000 if a.quick else a.persons
    geo, hists, units, inv = synthetic(persons)
    ts = load_tables()
    digits = {lv.name: lv.digits for lv in geo.levels}
    privacy = privacy_parameters({"persons": load_strategy("census2020_pl94"), "units": load_strategy("census2020_units")})
    levels = [lv.name for lv in geo.levels]
    work = Path(tempfile.mkdtemp(prefix="dptab-bench-release-"))
    res: dict[str, float] = {}
    try:
        res["tabulate_s"], lts = median_time(lambda: tabulate_levels(ts, geo, hists, units), a.repeats)
        res["checks_s"], fails = median_time(lambda: run_checks(ts, lts, digits, inv), a.repeats)
        assert fails == [], fails[:3]
        res["moe_s"], moe = median_time(lambda: release_moe90(
            {k: ts.of_kind(k) for k in ("persons", "units")}, ts.specs, variances_from_privacy(privacy), levels,
            {"persons": ["nation", "state"], "units": levels}), a.repeats)
        res["microdata_s"], micro = median_time(
            lambda: microdata_from_blocks(geo.blocks.geoids, hists["block"], ts.specs["persons"]), a.repeats)
        frames = {n: pl.concat([long_frame(ts.tables[n], lt.level, lt.geoids, unit_names(lt.level, lt.geoids),
                                           lt.counts[n], moe.get((n, lt.level))) for lt in lts]) for n in ts.tables}
        rows = sum(f.height for f in frames.values())

        def floor() -> None:
            d = work / "floor"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            for n, f in frames.items():
                f.write_parquet(d / f"{n}.parquet", compression="zstd")
                f.write_csv(d / f"{n}.csv")
            micro.write_parquet(d / "persons.parquet", compression="zstd")

        res["io_floor_s"], _ = median_time(floor, a.repeats)
        k = [0]

        def release(workers: int) -> Path:
            k[0] += 1
            return write_release(work / "releases", ReleaseMetadata(f"bench-{k[0]}", "bench", "0.1.0", "0" * 64),
                                 geo, hists, units, inv, privacy, workers=workers, csv=not a.no_csv)

        # one process (workers=1) against the release's second process (workers=2: microdata and
        # the data-file check beside the tables and the explorer), alternated so both see the
        # same machine; CPU of the whole process tree
        walls: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(a.repeats):
            for w in (1, 2):
                with TreeCPU() as cpu:
                    path = release(w)
                walls[w].append(cpu.wall)
                cpus[w].append(cpu.utilisation)
        res["write_release_s"] = statistics.median(walls[1])
        res["write_release_cpu_pct"] = 100 * statistics.median(cpus[1])
        res["write_release_2w_s"] = statistics.median(walls[2])
        res["write_release_2w_cpu_pct"] = 100 * statistics.median(cpus[2])
        res["ratio_2w_vs_1w"] = res["write_release_2w_s"] / res["write_release_s"]
        res["verify_s"], vf = median_time(lambda: verify_release(path), a.repeats)
        assert vf == [], vf[:3]
        res["release_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.update(persons=persons, blocks=geo.blocks.n_units, table_rows=rows, csv=not a.no_csv,
               ratio_release_vs_floor=res["write_release_s"] / res["io_floor_s"],
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for key, v in res.items():
        print(f"{key:>24}: {v:,.2f}" if isinstance(v, float) else f"{key:>24}: {v:,}")
    print(json.dumps({"benchmark": "release", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
