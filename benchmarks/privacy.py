"""Privacy-core timings other than the samplers: accounting and measurement throughput.

- accounting: ``load_strategy`` + CKS ε + PLD ε of the 2020 persons strategy (wall seconds);
- measurement: ``measure_shard`` at block level on a synthetic shard of ``--blocks`` blocks
  (Poisson(0.03) per cell, ~60 persons per block) in 20-block block groups, with parent-zero
  skipping and with ``full=True``: answers drawn per CPU-second, secure source, median of
  ``--repeats``; baseline in the same run: the bare sampler drawing the same number of values.

    .venv/bin/python benchmarks/privacy.py [--blocks 20000] [--repeats 3] [--quick]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import median_time  # noqa: E402
from pipeline.model.histogram import SparseHistogram  # noqa: E402
from pipeline.model.spec import load_spec  # noqa: E402
from pipeline.model.strategy import load_strategy  # noqa: E402
from pipeline.privacy.accounting import cks_epsilon
from pipeline.privacy.measure import measure_shard  # noqa: E402
from pipeline.privacy.pld import strategy_pld_epsilon  # noqa: E402
from pipeline.privacy.randomness import secure_source  # noqa: E402
from pipeline.privacy.samplers import discrete_gaussian  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2,000 blocks (make bench)")
    args = ap.parse_args()
    if args.quick:
        args.blocks = 2_000
    res: dict = {"blocks": args.blocks, "repeats": args.repeats}

    t_load, strat = median_time(lambda: load_strategy("census2020_pl94"), args.repeats, time.perf_counter)
    t_cks, eps = median_time(lambda: cks_epsilon(strat.total_rho, "1e-10"), args.repeats, time.perf_counter)
    t_pld, eps_pld = median_time(lambda: strategy_pld_epsilon(strat, "1e-10"), args.repeats, time.perf_counter)
    res["accounting_s"] = {"load_strategy": round(t_load, 4), "cks_epsilon": round(t_cks, 4),
                           "pld_epsilon": round(t_pld, 3)}
    res["epsilon"] = {"cks": str(eps), "pld": str(eps_pld)}
    print(f"load_strategy {t_load:.3f} s, CKS ε {float(eps)} in {t_cks:.3f} s, PLD ε {float(eps_pld)} in {t_pld:.2f} s")

    spec = load_spec("pl94")
    rng = np.random.default_rng(0)
    x = rng.poisson(0.03, size=(args.blocks, spec.n_cells))
    x[:, spec.structural_zero_mask] = 0
    hist = SparseHistogram.from_dense("block", x)
    n_bg = args.blocks // 20
    parent = SparseHistogram.from_dense("block_group", x[: n_bg * 20].reshape(n_bg, 20, -1).sum(axis=1))
    parent_of = np.minimum(np.arange(args.blocks) // 20, n_bg - 1)
    del x
    src = secure_source()
    with tempfile.TemporaryDirectory() as d:
        counter = iter(range(10**6))

        def run(full: bool):
            return measure_shard(Path(d) / f"m{next(counter)}.parquet", hist, spec, strat, "block", 0,
                                 args.blocks, src, parent=parent, parent_of=parent_of, full=full)

        for full in (False, True):
            t, r = median_time(lambda: run(full), args.repeats, time.process_time)
            key = "full" if full else "skip_parent_zero"
            base_t, _ = median_time(lambda: discrete_gaussian(strat.sigma2("block", "detailed"), r.rows, src),
                                    args.repeats, time.process_time)
            res[key] = {"rows": r.rows, "skipped": r.skipped, "cpu_s": round(t, 3),
                        "answers_per_s": round(r.rows / t), "bare_sampler_per_s": round(r.rows / base_t)}
            print(f"measure_shard {key}: {r.rows} answers ({r.skipped} skipped) in {t:.2f} CPU s = "
                  f"{r.rows / t / 1e6:.2f} M answers/s (bare sampler {r.rows / base_t / 1e6:.1f} M/s)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
