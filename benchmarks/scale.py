"""National-scale benchmark: `dptab run` at N persons, watched as a whole process tree.

    python benchmarks/scale.py --persons 10000000 [--persons 30000000 ...] [--workers 2]
                               [--estimator topdown] [--interval 1.0]

For each N (synthetic input cached in ``bench-out/synth-N-1``, made by ``dptab synth``): runs
the whole job (keyed noise, the 2020 strategies, ``output.csv: false``) in a fresh subprocess
and samples, every ``--interval`` seconds, the resident memory and CPU time of the job and every
descendant (its worker pool). Stage boundaries come from the run's ``state.json`` (each stage's
completion time); per stage it reports wall seconds and CPU utilisation (CPU seconds of the whole
tree / wall seconds, in % of one core: 200% = both cores busy on this machine). The I/O floor is
a read of the persons file + one group_by to block × cell counts + a write (same process).

Prints a line per sample batch and, last, one JSON object per N: wall, peak total RSS of the
tree, per-stage wall and CPU %, the floor. Large N take minutes to hours: run in the background.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def io_floor(persons: Path, out: Path) -> float:
    t0 = time.perf_counter()
    (pl.scan_parquet(persons).group_by(["geoid", "hhgq", "voting_age", "hispanic", "cenrace"]).len()
     .collect().write_parquet(out))
    return time.perf_counter() - t0


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sample(proc: psutil.Process) -> tuple[float, float]:
    """(total RSS in MB, total CPU seconds) of the process tree; vanished processes count 0."""
    rss = cpu = 0.0
    for p in _tree(proc):
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, cpu


def run_one(persons: int, workers: int, estimator: str, interval: float, work: Path) -> dict:
    cache = ROOT / "bench-out" / f"synth-{persons}-1"
    if not (cache / "units.parquet").exists():
        subprocess.run([sys.executable, "-m", "dptab.cli", "synth", "--persons", str(persons), "--seed", "1",
                        "--out", str(cache), "--quiet"], cwd=ROOT, check=True)
    tag = f"scale-{persons}"
    cfg = {"dataset_id": "scale", "confidential": False, "release_id": tag,
           "inputs": {"persons": str(cache / "persons.parquet"), "units": str(cache / "units.parquet")},
           "privacy": {"randomness": "keyed", "ledger": str(work / "ledger.sqlite"), "lifetime_rho": "100000"},
           "postprocess": {"estimator": estimator},
           "output": {"runs_dir": str(work / "runs"), "releases_dir": str(work / "releases"), "csv": False},
           "execution": {"workers": workers}}
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    floor = io_floor(cache / "persons.parquet", work / "floor.parquet")
    samples: list[tuple[float, float, float]] = []  # (unix time, rss MB, cpu s)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dptab.cli", "run", "--quiet", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    cpu_done = 0.0  # CPU of exited children is folded into their parent's children_* times
    while proc.poll() is None:
        rss, cpu = _sample(ps)
        cpu_done = max(cpu_done, cpu)
        samples.append((time.time(), rss, cpu_done))
        if len(samples) % 60 == 0:
            print(f"  {persons:,}: {time.time() - t0:7.0f} s, {rss:8.0f} MB, cpu {cpu_done:8.0f} s", flush=True)
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(out[-4000:])
    state = json.loads((work / "runs" / tag / "state.json").read_text())
    stages = _stages(state, t0, samples)
    return {"persons": persons, "estimator": estimator, "workers": workers, "wall_s": round(wall, 1),
            "peak_total_rss_mb": round(max((s[1] for s in samples), default=0.0)),
            "cpu_percent_whole_job": round(100 * (samples[-1][2] / wall if samples else 0.0)),
            "io_floor_s": round(floor, 2), "stages": stages}


def _stages(state: dict, t0: float, samples: list[tuple[float, float, float]]) -> dict[str, dict]:
    """Per stage group (inputs, each kind × level, margins, publish): wall, CPU % and peak RSS
    between the previous group's completion and its own (completion times from state.json)."""
    ends: dict[str, float] = {}
    for name, info in state["done"].items():
        at = dt.datetime.strptime(info["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
        parts = name.split(":")
        group = "inputs" if name == "inputs" else (
            f"{parts[1]}:{parts[2]}" if parts[0] in ("shard", "level", "measure") else
            f"{parts[1]}:gls" if parts[0] == "estimate" else parts[0])
        ends[group] = max(ends.get(group, 0.0), at + 1.0)  # state times have 1 s resolution
    out, start = {}, t0
    for group, end in sorted(ends.items(), key=lambda kv: kv[1]):
        win = [s for s in samples if start <= s[0] <= end]
        if len(win) >= 2:
            cpu = 100 * (win[-1][2] - win[0][2]) / max(win[-1][0] - win[0][0], 1e-9)
            peak = max(s[1] for s in win)
        else:
            cpu, peak = float("nan"), float("nan")
        out[group] = {"wall_s": round(end - start, 1), "cpu_percent": None if cpu != cpu else round(cpu),
                      "peak_total_rss_mb": None if peak != peak else round(peak)}
        start = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, action="append", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--estimator", default="topdown", choices=["topdown", "full"])
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    for n in args.persons:
        with tempfile.TemporaryDirectory(prefix="dptab-scale-") as tmp:
            res = run_one(n, args.workers, args.estimator, args.interval, Path(tmp))
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
