"""Review metrics speed: every metric by size bin for a block-sized level vs a bare MAE floor.

``python benchmarks/review.py [--quick] [--units N]``: synthetic truth (Poisson counts) and
three estimators for ``N`` units × the 308 review statistics; times (median of 3)
``level_metrics`` (all metrics, 7 bins, 3 estimators, redistricting target) against the floor
``|estimate − truth|.mean(axis=0)`` for the same arrays, and the WLS design solve
(2,016 × 2,016, the 2020 block design). Prints figures and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# benchmarks/pipeline.py would shadow the `pipeline` package: import from the repository root
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from benchmarks.timing import median_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--units", type=int, default=25_181)  # Rhode Island's 2010 blocks
    args = ap.parse_args()
    n = 5_000 if args.quick else args.units

    from pipeline.model.spec import load_spec
    from pipeline.model.strategy import load_strategy
    from pipeline.review.comparators import _solve_design
    from pipeline.review.metrics import level_metrics, statistic_vectors

    stats = statistic_vectors()
    rng = np.random.default_rng(0)
    truth = rng.poisson(4.0, size=(n, len(stats.names))).astype(np.float64)
    truth[:, stats.index("total")] = rng.poisson(40.0, size=n)
    ests = {k: truth + rng.normal(0, 2, size=truth.shape) for k in ("published", "noisy_clipped", "wls")}

    t_metrics = median_time(lambda: level_metrics("block", stats, truth, ests))[0]
    t_floor = median_time(lambda: [np.abs(e - truth).mean(axis=0) for e in ests.values()])[0]
    spec = load_spec("pl94")
    strat = load_strategy("census2020_pl94")
    design = tuple((q, float(strat.sigma2("block", q))) for q in strat.queries("block"))
    t_wls = median_time(lambda: _solve_design(spec, stats, design))[0]
    out = {"units": n, "statistics": len(stats.names), "level_metrics_s": round(t_metrics, 3),
           "mae_floor_s": round(t_floor, 4), "ratio_vs_floor": round(t_metrics / t_floor, 1),
           "wls_design_solve_s": round(t_wls, 3)}
    print(f"level_metrics: {n:,} units x {len(stats.names)} statistics x 3 estimators: {t_metrics:.2f} s "
          f"(bare MAE floor {t_floor:.3f} s, ratio {t_metrics / t_floor:.0f}x)")
    print(f"WLS design solve (2016 x 2016, block design of census2020_pl94): {t_wls:.2f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
