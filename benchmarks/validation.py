"""Benchmark: total input validation (``validate_inputs``) against a bare-scan floor.

Generates N persons in our layout (uniform-ish over ~N/30 blocks, 2.5% in GQ) and a matching
units file in a temp dir, then times, each in a fresh subprocess (so peak RSS is per run):

- ``validate``: :func:`pipeline.io.validate_inputs` on both files (all checks);
- ``floor``: a bare streaming scan reading every column of both files once plus one
  ``group_by(geoid).len()`` of each (the minimum any per-block cross-file check needs).

Prints medians of ``--repeats`` runs, the ratio validate/floor, and peak RSS; last line JSON.

    .venv/bin/python benchmarks/validation.py --persons 10000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import polars as pl
from pipeline.io import validate_inputs
from pipeline.spec import load_spec
persons, units, mode = sys.argv[1], sys.argv[2], sys.argv[3]
spec = load_spec("pl94")
t0 = time.perf_counter()
if mode == "validate":
    validate_inputs(persons, units, spec)
else:
    for f in (persons, units):
        lf = pl.scan_parquet(f)
        lf.select(pl.len(), *[pl.col(c).max() for c in lf.collect_schema().names()]).collect(engine="streaming")
        lf.group_by("geoid").len().select(pl.len()).collect(engine="streaming")
dt = time.perf_counter() - t0
# VmHWM (peak RSS of this process image): ru_maxrss would carry the parent's peak across exec
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(dt, int(hwm) / 1024)
"""


def make_inputs(n: int, out: Path, seed: int = 1) -> tuple[Path, Path]:
    """Write persons.parquet (n rows) and a consistent units.parquet into ``out``."""
    rng = np.random.default_rng(seed)
    n_blocks = max(n // 30, 1)
    b = np.arange(n_blocks)
    blocks = pl.DataFrame({"b": b}).select(pl.format(
        "{}{}{}{}", (pl.col("b") // 200_000 + 1).cast(pl.String).str.zfill(2),
        (pl.col("b") // 20_000 % 10 * 3 + 1).cast(pl.String).str.zfill(3),
        (pl.col("b") // 40 % 500 * 100 + 100).cast(pl.String).str.zfill(6),
        (pl.col("b") % 40 + 1000).cast(pl.String).str.zfill(4)).alias("geoid"))["geoid"]
    pb = np.sort(rng.integers(0, n_blocks, n))
    # GQ persons only in every 50th block, type 1 + (block // 50) % 7
    gq_block = (pb % 50 == 0)
    hhgq = np.where(gq_block & (rng.random(n) < 0.9), 1 + (pb // 50) % 7, 0).astype(np.int8)
    va = (rng.random(n) < 0.77).astype(np.int8)
    va[hhgq == 3] = 1
    persons = pl.DataFrame({
        "geoid": blocks.gather(pb), "hhgq": hhgq, "voting_age": va,
        "hispanic": (rng.random(n) < 0.18).astype(np.int8),
        "cenrace": rng.choice(np.arange(1, 64, dtype=np.int8), n, p=np.r_[[0.6, 0.13, 0.01, 0.06, 0.002, 0.05],
                                                                       np.full(57, 0.148 / 57)])})
    p = out / "persons.parquet"
    persons.write_parquet(p, row_group_size=1_000_000)
    per = persons.group_by("geoid").agg((pl.col("hhgq") == 0).sum().alias("hh"), pl.col("hhgq").max().alias("g"),
                                        (pl.col("hhgq") > 0).any().alias("has_gq"))
    hu = per.select("geoid", ((pl.col("hh") + 1) // 2 + 1).alias("n"), pl.col("hh"))
    hus = hu.select(pl.col("geoid").repeat_by("n").explode(), pl.int_ranges(0, "n").explode().alias("i"),
                    pl.col("hh").repeat_by("n").explode())
    hus = hus.select("geoid", pl.lit(0, pl.Int8).alias("kind"), (pl.col("i") < (pl.col("hh") + 1) // 2).alias("occupied"))
    fac = per.filter("has_gq").select("geoid", pl.col("g").cast(pl.Int8).alias("kind"),
                                      pl.lit(None, pl.Boolean).alias("occupied"))
    units = pl.concat([hus, fac]).with_row_index("unit_id").with_columns(pl.col("unit_id").cast(pl.String))
    u = out / "units.parquet"
    units.write_parquet(u, row_group_size=1_000_000)
    return p, u


def run_child(p: Path, u: Path, mode: str) -> tuple[float, float]:
    res = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(p), str(u), mode],
                         capture_output=True, text=True, check=True)
    dt, rss = res.stdout.split()
    return float(dt), float(rss)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 M persons")
    args = ap.parse_args()
    n = 1_000_000 if args.quick else args.persons
    with tempfile.TemporaryDirectory(prefix="dptab-bench-val-") as d:
        t0 = time.perf_counter()
        p, u = make_inputs(n, Path(d))
        gen = time.perf_counter() - t0
        units_rows = pl.scan_parquet(u).select(pl.len()).collect().item()
        print(f"generated {n:,} persons, {units_rows:,} units in {gen:.1f} s "
              f"({p.stat().st_size / 2**20:.0f} + {u.stat().st_size / 2**20:.0f} MiB)")
        runs: dict[str, list[tuple[float, float]]] = {"validate": [], "floor": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for mode in runs:
                runs[mode].append(run_child(p, u, mode))
    med = {m: statistics.median(t for t, _ in r) for m, r in runs.items()}
    rss = {m: max(r for _, r in v) for m, v in runs.items()}
    ratio = med["validate"] / med["floor"]
    for m in runs:
        print(f"{m:9s} median {med[m]:7.2f} s  ({n / med[m] / 1e6:5.2f} M persons/s)  peak RSS {rss[m]:7.0f} MiB  "
              f"runs: {', '.join(f'{t:.2f}' for t, _ in runs[m])}")
    print(f"validate / floor = {ratio:.2f}")
    print(json.dumps({"persons": n, "units": units_rows, "validate_s": round(med["validate"], 3),
                      "floor_s": round(med["floor"], 3), "ratio": round(ratio, 3),
                      "validate_peak_rss_mib": round(rss["validate"]), "floor_peak_rss_mib": round(rss["floor"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
