"""Whole-job benchmark: `dptab run` on N synthetic persons against the I/O floor.

    python benchmarks/pipeline.py --persons 1000000 [--repeats 3] [--workers 2]
    python benchmarks/pipeline.py --persons 1000000 --repeats 2 --estimators topdown full

With several ``--estimators`` each repeat runs every estimator in turn (alternating, so machine
noise hits both alike) and the last JSON line also gives the wall-time ratio of each to the first.

The floor is what any tabulation of the same file must do: read the persons Parquet, one
group_by to block x cell counts, write the result (measured in the same process, same run).
Each job runs in a fresh subprocess (so its peak RSS is its own); per-stage times come from
the run's ``state.json``. Prints a table and a last line of JSON (medians).
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

import polars as pl
import yaml
from timing import run_stages

ROOT = Path(__file__).resolve().parent.parent


def io_floor(persons: Path, out: Path) -> float:
    """Seconds to read persons, count per (block, hhgq, voting_age, hispanic, cenrace), write."""
    t0 = time.perf_counter()
    counts = (pl.scan_parquet(persons)
              .group_by(["geoid", "hhgq", "voting_age", "hispanic", "cenrace"]).len()
              .collect())
    counts.write_parquet(out)
    return time.perf_counter() - t0


_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")


def one_job(inputs: Path, work: Path, tag: str, workers: int, estimator: str = "topdown") -> dict:
    cfg = {
        "postprocess": {"estimator": estimator},
        "dataset_id": "bench", "confidential": False, "release_id": tag,
        "inputs": {"persons": str(inputs / "persons.parquet"), "units": str(inputs / "units.parquet")},
        "privacy": {"randomness": "keyed", "ledger": str(work / "ledger.sqlite"), "lifetime_rho": "100000"},
        "output": {"runs_dir": str(work / "runs"), "releases_dir": str(work / "releases"),
                   "publish_measurements": True},
        "execution": {"workers": workers},
    }
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    # a fresh wrapper per job reports the largest maximum RSS among the job and its workers
    res = subprocess.run([sys.executable, "-c", _WRAP, sys.executable, "-m", "dptab.cli", "run", "--quiet", str(path)],
                         cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])
    peak_mb = int(res.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0]) / 1024
    done = run_stages(work / "runs" / tag)
    stages: dict[str, float] = {"inputs": done["inputs"]["seconds"]}
    for name, info in done.items():
        if name.startswith("level:"):
            _, kind, level = name.split(":")
            stages[f"{kind}:{level}"] = info["seconds"]
        elif name.startswith("measure:"):  # the full estimator's measure-first steps, per kind
            kind = name.split(":")[1]
            stages[f"{kind}:measure"] = stages.get(f"{kind}:measure", 0.0) + info["seconds"]
        elif name.startswith("estimate:"):
            stages[f"{name.split(':')[1]}:gls"] = info["seconds"]
    stages["publish"] = done["publish"].get("seconds", float("nan"))
    return {"wall": wall, "peak_mb": peak_mb, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--estimators", nargs="+", default=["topdown"], choices=["topdown", "full"])
    args = ap.parse_args()
    cache = ROOT / "bench-out" / f"synth-{args.persons}-{args.seed}"
    if not (cache / "units.parquet").exists():
        subprocess.run([sys.executable, "-m", "dptab.cli", "synth", "--persons", str(args.persons),
                        "--seed", str(args.seed), "--out", str(cache)], cwd=ROOT, check=True)
    jobs: dict[str, list[dict]] = {e: [] for e in args.estimators}
    floors = []
    with tempfile.TemporaryDirectory(prefix="dptab-bench-") as tmp:
        work = Path(tmp)
        for r in range(args.repeats):
            floors.append(io_floor(cache / "persons.parquet", work / f"floor-{r}.parquet"))
            for est in args.estimators:
                jobs[est].append(one_job(cache, work, f"rep{r}-{est}", args.workers, est))
                print(f"repeat {r} {est}: job {jobs[est][-1]['wall']:.1f} s, floor {floors[-1]:.2f} s, "
                      f"peak {jobs[est][-1]['peak_mb']:.0f} MB", flush=True)
    med = statistics.median
    results = {}
    for est, runs in jobs.items():
        stage_names = list(runs[0]["stages"])
        stage_med = {s: round(med([j["stages"].get(s, float("nan")) for j in runs]), 2) for s in stage_names}
        print(est)
        for s, v in stage_med.items():
            print(f"  {s:<22} {v:8.2f} s")
        results[est] = {"wall_s": round(med([j["wall"] for j in runs]), 2),
                        "ratio_vs_floor": round(med([j["wall"] / f for j, f in zip(runs, floors)]), 1),
                        "peak_rss_mb": round(med([j["peak_mb"] for j in runs])), "stages_s": stage_med}
    base = args.estimators[0]
    out = {"persons": args.persons, "repeats": args.repeats, "workers": args.workers,
           "io_floor_s": round(med(floors), 3), **results[base],
           "estimators": {e: {**r, "wall_ratio_vs_" + base: round(r["wall_s"] / results[base]["wall_s"], 3)}
                          for e, r in results.items()} if len(results) > 1 else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
