"""Benchmark: the full estimator's design margins of error (``release_margins(..., "full")``) on
the geography of a national-scale synthetic input — time and peak memory, fitted in parts (the
default, ``MARGIN_PART_UNITS`` bottom units a part) against the whole tree at once (one part).

    python benchmarks/margins.py --persons 331000000 [--repeats 3] [--part-units 100000 ...]

The geography is the one ``dptab run`` makes from the cached synthetic input of
``benchmarks/scale.py`` (``bench-out/synth-N-1``, made by ``dptab synth`` if missing): every block
of the units file, the 2020 strategies' variances, the default tables, state totals and block
housing units invariant. Each measurement runs in a fresh subprocess (its peak resident memory is
its own, ``ru_maxrss``), the configurations alternated ``--repeats`` times; ``--part-units 0``
stands for the whole tree at once. Prints a line per run and, last, one JSON object with the
medians and the size of the margins kept (the publish stage and ``dptab verify`` each make
these margins once).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the repository: benchmarks/pipeline.py is a script


def one(persons: int, part_units: int) -> dict:
    """One measurement in this process: ``{seconds, peak_rss_mb, units}``."""
    import polars as pl
    from scale import synthetic_input

    from pipeline.job.context import configured_strategies
    from pipeline.model.config import load_config
    from pipeline.model.design import design
    from pipeline.model.geography import Geography
    from pipeline.release import uncertainty
    from pipeline.release.manifest import release_margins
    from pipeline.release.tables import load_tables

    cache = synthetic_input(persons)
    with tempfile.TemporaryDirectory() as tmp:  # the defaults, as scale.py's runs have them
        path = Path(tmp) / "config.yaml"
        path.write_text(json.dumps({"dataset_id": "margins-bench", "inputs": {
            "persons": str(cache / "persons.parquet"), "units": str(cache / "units.parquet")}}))
        cfg = load_config(path)
    levels = cfg.geography.geolevels()
    blocks = pl.scan_parquet(cache / "units.parquet").select("geoid").unique().sort("geoid").collect()
    geo = Geography.from_block_geoids(blocks["geoid"].to_numpy(), levels)
    del blocks
    if part_units > 0:
        uncertainty.MARGIN_PART_UNITS = part_units
    else:  # one part: the whole tree below the split level fitted at once
        uncertainty.MARGIN_PART_UNITS = geo.levels[-1].n_units + 1
    t0 = time.perf_counter()
    moe = release_margins(load_tables(cfg.tables), design(configured_strategies(cfg)).variances(),
                    [lv.name for lv in geo.levels], {lv.name: lv.digits for lv in geo.levels}, True, True,
                    "full", [lv.child_ptr for lv in geo.levels[:-1]])
    seconds = time.perf_counter() - t0
    held = {id(a): a.nbytes for v in moe.values()  # what the caller keeps (arrays shared by tables once)
            for a in ((v.values, v.rows) if isinstance(v, uncertainty.RepeatedRows) else (v,))}
    return {"seconds": round(seconds, 2), "result_mb": round(sum(held.values()) / 2**20),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "units": {lv.name: int(lv.n_units) for lv in geo.levels}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part-units", type=int, action="append",
                    help="bottom units a part (0: the whole tree at once); default: the default and 0")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one measurement
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.persons, args.one)))
        return
    from pipeline.release.uncertainty import MARGIN_PART_UNITS

    configs = args.part_units or [MARGIN_PART_UNITS, 0]
    runs: dict[int, list[dict]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:
            out = subprocess.run([sys.executable, __file__, "--persons", str(args.persons), "--one", str(c)],
                                 check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[c].append(res)
            print(f"round {r + 1}, part units {c or 'whole tree'}: {res['seconds']} s, "
                  f"peak {res['peak_rss_mb']} MB, result {res['result_mb']} MB", flush=True)
    print(json.dumps({"persons": args.persons, "units": runs[configs[0]][0]["units"],
                      "runs": [{"part_units": c or "whole tree",
                                "median_s": statistics.median(x["seconds"] for x in rs),
                                "median_peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                                "result_mb": rs[0]["result_mb"]}
                               for c, rs in runs.items()]}))


if __name__ == "__main__":
    main()
