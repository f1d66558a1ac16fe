"""Benchmark the histogram build against its floor, measured in the same process and run.

- floor: a bare polars scan of persons.parquet + ``group_by(geoid, hhgq, voting_age, hispanic,
  cenrace).len()`` (streaming engine) — the least work that counts every block cell;
- ours: ``build_person_histograms(read_persons(file), geography, spec)`` — the normalising
  reader, one group_by at block level, mapping to block indices, sorting, and every upper level
  by summing children (what ``dptab histograms`` and the run do).
Runs alternate floor/ours to share the machine's noise; reported: medians and the median of
the per-pair ratios, in wall time and in process CPU time (all threads; less sensitive to other
jobs on the shared cores). The geography (from the units file) and unit counts are timed separately.

    .venv/bin/python benchmarks/histograms.py              # 10 M persons, 5 pairs
    .venv/bin/python benchmarks/histograms.py --quick      # 1 M persons, 3 pairs
    .venv/bin/python benchmarks/histograms.py --data DIR   # use DIR/persons.parquet, DIR/units.parquet
    .venv/bin/python benchmarks/histograms.py --national-geography   # 2020-sized block hierarchy only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from pipeline.inputs.histograms import build_person_histograms, build_unit_counts  # noqa: E402
from pipeline.inputs.readers import read_persons, read_units  # noqa: E402
from pipeline.inputs.synth import synthesize  # noqa: E402
from pipeline.model.geography import Geography  # noqa: E402
from pipeline.model.spec import load_spec  # noqa: E402

ATTRS = ["hhgq", "voting_age", "hispanic", "cenrace"]


def floor(path: Path) -> int:
    """The bare scan + group_by; returns the number of non-empty (block, cell) groups."""
    return pl.scan_parquet(path).group_by("geoid", *ATTRS).len().collect(engine="streaming").height


def national_geography() -> dict:
    """Build the geography of a national-size block set (all 3,143 counties' real tract and
    block-group counts, blocks per block group as in synth): time and bytes held."""
    import resource

    import numpy as np

    from pipeline.inputs import synth_model as m
    from pipeline.inputs.synth import plan_counties

    plan = plan_counties(331_000_000, 1)
    rng = np.random.default_rng(1)
    parts = []
    for st, co, nt, nbg in plan.select("state", "county", "n_tracts", "n_bg").iter_rows():
        per = m.split_tracts(rng, nt, nbg)
        tc = m.tract_codes(rng, nt)
        nb = m.blocks_per_bg(rng, int(per.sum()))
        tract = np.repeat(np.repeat(tc, per), nb)
        bg = np.repeat(np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per) + 1, nb)
        seq = np.arange(nb.sum()) - np.repeat(np.cumsum(nb) - nb, nb)
        parts.append(int(st) * 10**13 + int(co) * 10**10 + tract * 10_000 + bg * 1000 + seq)
    codes = np.concatenate(parts)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    geo = Geography.from_block_codes(codes)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    strings = sum(lv.geoids.nbytes for lv in geo.levels)
    strings_s = time.perf_counter() - t0
    return {"levels": {lv.name: lv.n_units for lv in geo.levels}, "build_seconds": round(build_s, 2),
            "int_arrays_mib": round(geo.nbytes / 2**20, 1), "geoid_strings_mib": round(strings / 2**20, 1),
            "geoid_strings_seconds": round(strings_s, 2),
            "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=None, help="floor/ours pairs (default 5, quick 3)")
    ap.add_argument("--quick", action="store_true", help="1 M persons")
    ap.add_argument("--data", type=Path, default=None, help="existing synth output directory")
    ap.add_argument("--national-geography", action="store_true", help="only the national-size geography build")
    args = ap.parse_args()
    if args.national_geography:
        res = national_geography()
        for k, v in res.items():
            print(f"{k:>22}: {v}")
        print(json.dumps(res))
        return 0
    n = 1_000_000 if args.quick else args.persons
    repeats = args.repeats or (3 if args.quick else 5)
    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="dptab-bench-hist-"))
        t0 = time.perf_counter()
        synthesize(n, 1, tmp)
        print(f"synth {n:,} persons: {time.perf_counter() - t0:.1f} s", flush=True)
    data = args.data or tmp
    persons, units = data / "persons.parquet", data / "units.parquet"
    spec = load_spec("pl94")
    try:
        t0 = time.perf_counter()
        u = read_units(units)
        geo = Geography.from_block_geoids(u.select("geoid").unique().collect(engine="streaming")["geoid"])
        geo_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_unit_counts(u, geo)
        units_s = time.perf_counter() - t0
        floor(persons)  # warm the page cache for both
        fl, ours, ratios, fl_cpu, ours_cpu, cpu_ratios = [], [], [], [], [], []
        for r in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            groups = floor(persons)
            fl.append(time.perf_counter() - t0)
            fl_cpu.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            hists = build_person_histograms(read_persons(persons), geo, spec)
            ours.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
            ratios.append(ours[-1] / fl[-1])
            cpu_ratios.append(ours_cpu[-1] / fl_cpu[-1])
            assert hists["block"].nnz == groups  # same work: one entry per non-empty block cell
            print(f"pair {r + 1}: floor {fl[-1]:.2f} s ({fl_cpu[-1]:.2f} s CPU), ours {ours[-1]:.2f} s "
                  f"({ours_cpu[-1]:.2f} s CPU), ratio {ratios[-1]:.2f} (CPU {cpu_ratios[-1]:.2f})", flush=True)
        total = hists["nation"].total()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "persons": total, "pairs": repeats,
        "blocks": geo.blocks.n_units, "block_cells_nonzero": groups,
        "levels": {lv.name: lv.n_units for lv in geo.levels},
        "floor_seconds_median": round(statistics.median(fl), 3),
        "ours_seconds_median": round(statistics.median(ours), 3),
        "ratio_median": round(statistics.median(ratios), 2),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(fl), 2),
        "floor_cpu_seconds_median": round(statistics.median(fl_cpu), 3),
        "ours_cpu_seconds_median": round(statistics.median(ours_cpu), 3),
        "cpu_ratio_median": round(statistics.median(cpu_ratios), 2),
        "persons_per_second": round(total / statistics.median(ours)),
        "geography_seconds": round(geo_s, 3), "unit_counts_seconds": round(units_s, 3),
        "geography_int_arrays_mib": round(geo.nbytes / 2**20, 1),
    }
    for k, v in res.items():
        print(f"{k:>26}: {v}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
