"""The bookkeeping cost of one shard as a run grows: what a shard's stage pays to check and record
itself in the run directory, whatever its data (``pipeline.job.rundir``).

    python benchmarks/bookkeeping.py [--shards 500 --shards 2000 ...] [--repeats 3] [--code CHECKOUT]

For N shards (a national run has ~5,000: ``dptab run --plan``), records N shard stages one after
the other the way ``stage_shard`` does — a fresh ``RunDir`` handle, ``is_done``, ``verified`` of a
level file and of the previous shard's output, ``mark_done`` with two output files — and prints
the median seconds per shard over the last tenth of the shards (when the run directory already
holds ~N records) and in total. ``--code``: the checkout whose ``pipeline`` is timed (default:
this one); run it with two to compare:
with every record rewritten into one ``state.json`` the cost per shard grows with N (quadratic
over the run); with ``shards.jsonl`` it does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/pipeline.py would shadow the `pipeline` package: never import from this folder
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def run(n: int) -> tuple[float, float]:
    """(median s per shard over the last tenth, total s) for ``n`` shard records."""
    from pipeline.job.rundir import RunDir

    with tempfile.TemporaryDirectory(prefix="dptab-bookkeeping-") as tmp:
        rd = RunDir.create(Path(tmp), "r", {"release_id": "r"})
        level = rd.root / "solved" / "persons_county.parquet"
        level.parent.mkdir(parents=True)
        level.write_bytes(b"x" * 4096)
        rd.mark_done("level:persons:county", {"shards": 1}, files=[level])
        # a shard's record as a run writes it: counts, seconds and the engine's diagnostics
        info = {"kind": "persons", "level": "block", "parents": 105, "children": 2513, "measured_rows": 178635,
                "measurements_reused": False, "seconds": 0.476,
                "diagnostics": {"children": 2513, "dropped_answers": 0, "fallbacks": 0, "iterations": 2760,
                                "level": "block", "max_infeas": 0.0, "max_iterations": 30,
                                "max_kkt_spread": 0.0003895072711732478, "max_rel_gap": 9.940210513487146e-10,
                                "methods": {"admm-batch": 101, "admm-eig": 4}, "multipass_fallback": 0,
                                "parents": 105, "relaxed_constraints": 0, "rounding_widened": 0,
                                "seconds": 0.35, "shortcuts": 0, "uncertified": 0, "variables": 35519}}
        times = []
        t_all = time.perf_counter()
        for s in range(n):
            t0 = time.perf_counter()
            h = RunDir.open(rd.root)  # every shard opens the run directory afresh
            stage = f"shard:persons:block:{s:05d}"
            assert not h.is_done(stage)
            h.verified(level)
            if s:
                h.verified(rd.root / "solved" / "persons" / "block" / f"shard-{s - 1:05d}.parquet")
            out = [rd.root / "measurements" / "persons" / "block" / f"shard-{s:05d}.parquet",
                   rd.root / "solved" / "persons" / "block" / f"shard-{s:05d}.parquet"]
            for p in out:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"y" * 4096)
            h.mark_done(stage, {**info, "shard": s}, files=out)
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        return statistics.median(times[-max(1, n // 10):]), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", type=Path, default=HERE.parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    for n in args.shards or [500, 2000]:
        res = [run(n) for _ in range(args.repeats)]
        per = statistics.median(r[0] for r in res)
        total = statistics.median(r[1] for r in res)
        print(json.dumps({"code": str(args.code), "shards": n, "median_s_per_shard_at_end": round(per, 5), "median_total_s": round(total, 2),
                          "repeats": args.repeats}), flush=True)


if __name__ == "__main__":
    main()
