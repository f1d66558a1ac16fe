"""Benchmark ``dptab synth``: persons/s and peak memory (max RSS of the process).

Each run is a fresh ``python -m dptab.cli synth`` subprocess (peak RSS from ``wait4``).
Baselines measured in the same run:
- time: a bare polars read + zstd rewrite of the very files synth produced (the I/O floor for
  the same rows and bytes); ratio = synth seconds / rewrite seconds;
- memory: the same synth at 1/10 of the persons — bounded memory means the peak does not grow
  with the population (ratio close to 1), and the RSS of the interpreter with the imports alone.

    .venv/bin/python benchmarks/synth.py                 # 10 M persons, 3 runs
    .venv/bin/python benchmarks/synth.py --quick         # 1 M persons, 3 runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB (printed by the child as MAXRSS_KB=...), and stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {err[-2000:]}")
    rss_line = [l for l in err.splitlines() if l.startswith("MAXRSS_KB=")]
    rss = float(rss_line[-1].split("=")[1]) / 1024 if rss_line else float("nan")
    return secs, rss, out


def _synth_argv(n: int, seed: int, out: Path) -> list[str]:
    # a tiny wrapper prints the child's own peak RSS (ru_maxrss of RUSAGE_SELF) on exit
    code = ("import resource, sys, atexit\n"
            "atexit.register(lambda: print(f'MAXRSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr))\n"
            "from dptab.cli import app\n"
            f"app(['synth', '--persons', '{n}', '--seed', '{seed}', '--out', r'{out}', '--quiet'], standalone_mode=False)\n")
    return [sys.executable, "-c", code]


def _rewrite_argv(src: Path, dst: Path) -> list[str]:
    code = ("import polars as pl\n"
            f"for name in ('persons.parquet', 'units.parquet'):\n"
            f"    pl.read_parquet(r'{src}/' + name).write_parquet(r'{dst}/' + name, compression='zstd')\n")
    return [sys.executable, "-c", code]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 M persons")
    args = ap.parse_args()
    n = 1_000_000 if args.quick else args.persons
    work = Path(tempfile.mkdtemp(prefix="dptab-bench-synth-"))
    try:
        idle = _run([sys.executable, "-c", "import resource, sys\nimport pipeline.synth, dptab.cli\n"
                     "print(f'MAXRSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)"])[1]
        small = _run(_synth_argv(max(n // 10, 1), 1, work / "small"))
        synth_s, synth_rss, rewrite_s = [], [], []
        for r in range(args.repeats):
            shutil.rmtree(work / "full", ignore_errors=True)
            s, rss, out = _run(_synth_argv(n, 1, work / "full"))
            synth_s.append(s)
            synth_rss.append(rss)
            (work / "copy").mkdir(exist_ok=True)
            rewrite_s.append(_run(_rewrite_argv(work / "full", work / "copy"))[0])
            print(f"run {r + 1}: synth {s:.2f} s, peak {rss:.0f} MiB; rewrite {rewrite_s[-1]:.2f} s", flush=True)
        sizes = {f: (work / "full" / f).stat().st_size / 2**20 for f in ("persons.parquet", "units.parquet")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median(synth_s)
    ratios = [a / b for a, b in zip(synth_s, rewrite_s)]
    res = {
        "persons": n, "runs": args.repeats,
        "synth_seconds_median": round(med, 3),
        "persons_per_second": round(n / med),
        "rewrite_seconds_median": round(statistics.median(rewrite_s), 3),
        "ratio_to_rewrite_median": round(statistics.median(ratios), 2),
        "peak_rss_mib_median": round(statistics.median(synth_rss), 1),
        "peak_rss_mib_at_tenth": round(small[1], 1),
        "rss_ratio_full_to_tenth": round(statistics.median(synth_rss) / small[1], 2),
        "rss_mib_imports_only": round(idle, 1),
        "persons_file_mib": round(sizes["persons.parquet"], 1),
        "units_file_mib": round(sizes["units.parquet"], 1),
        "extrapolated_331M_minutes": round(331e6 / (n / med) / 60, 1),
    }
    for k, v in res.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
