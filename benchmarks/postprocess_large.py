"""Large multipass parents: one county-shaped parent per run, ``solve_parent`` end to end.

The parent: ``random_parent(k, pop=40, seed=100, alpha=1.0, gq=True)`` (GQ facilities in
~40 % of the children, per-child zeros on the other GQ types) with the 2020 tract variances
(sigma^2 = 1 / (2 rho_q), as ``production_variances`` in ``benchmarks/postprocess.py``), solved with
``SolveOptions(tol=1e-6, multipass=True)``: pass 1 holds the child totals, pass 2 is the ADMM
least squares with held totals (the slow part), then min-cost-flow rounding and the post-checks.
One BLAS thread. Each (code tree, k) runs in a fresh subprocess; ``--baseline DIR`` times a
second code tree (e.g. ``git archive <commit> pipeline schemas | tar -x -C DIR``) in the same
session, interleaved with the current tree, and compares the answers.

    .venv/bin/python benchmarks/postprocess_large.py --children 100 300 --repeat 3
    .venv/bin/python benchmarks/postprocess_large.py --children 3000 --repeat 1 --baseline /tmp/base

Prints one JSON line per run and a summary per k (median seconds, iterations, ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def production_variances(level: str) -> dict[str, float]:
    """Per-query variances 1 / (2 rho_q) of the 2020 strategy (same as benchmarks/postprocess.py;
    repeated so that this script does not import a module that changes with the engine)."""
    from fractions import Fraction

    import yaml

    raw = yaml.safe_load((ROOT / "schemas/strategies/census2020_pl94.yaml").read_text())
    rho = Fraction(raw["rho"])
    L = raw["levels"][level]
    return {q: float(1 / (2 * rho * Fraction(L["share"]) * Fraction(s)))
            for q, s in L["queries"].items()}


def child(root: str, k: int, seed: int, out: str | None) -> None:
    """Run one solve with ``pipeline`` imported from ``root``; print one JSON line."""
    sys.path.insert(0, root)
    import pipeline  # noqa: F401  (must resolve to ``root`` before anything else imports it)

    sys.path.insert(1, str(ROOT / "tests"))
    import time

    import numpy as np
    from postprocess_cases import random_parent
    from threadpoolctl import threadpool_limits

    import pipeline.postprocess.parent as parent_mod

    assert Path(pipeline.__file__).resolve().is_relative_to(Path(root).resolve())
    solves = []
    try:  # the one-parent ADMM as the solver module calls it, or parent.admm before
        import pipeline.postprocess.solver as admm_mod
    except ImportError:
        admm_mod = parent_mod
    admm = admm_mod.admm

    def traced(*a, **kw):  # record the L2 objective and certificate of every ADMM solve
        res = admm(*a, **kw)
        solves.append(dict(f=res.f, gap=res.gap, infeas=res.infeas, it=res.iterations,
                           certified=res.certified))
        return res

    admm_mod.admm = traced
    prob, _ = random_parent(k=k, pop=40, seed=seed, alpha=1.0,
                            variances=production_variances("tract"), gq=True)
    with threadpool_limits(1, "blas"):
        t0 = time.perf_counter()
        N, st = parent_mod.solve_parent(prob, parent_mod.SolveOptions(tol=1e-6, multipass=True))
        sec = time.perf_counter() - t0
    if out:
        np.save(out, N)
    print(json.dumps(dict(root=root, k=k, seconds=sec, iterations=st.iterations,
                          method=st.method, certified=st.certified, rel_gap=st.rel_gap,
                          infeas=st.infeas, solves=solves, load=os.getloadavg()[0])), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--children", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--baseline", default=None, help="second code tree to time (same session)")
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args._child[0], int(args._child[1]), int(args._child[2]), args._out)
        return
    trees = [("current", str(ROOT))] + ([("baseline", args.baseline)] if args.baseline else [])
    tmp = Path(tempfile.mkdtemp(prefix="pp_large_"))
    for k in args.children:
        runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for rep in range(args.repeat):
            for name, root in trees:  # interleaved, so both see the same machine load
                out = tmp / f"{name}_{k}.npy"
                cmd = [sys.executable, __file__, "--_child", root, str(k), str(args.seed),
                       "--_out", str(out)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rec = json.loads(line.strip().splitlines()[-1])
                rec["tree"] = name
                runs[name].append(rec)
                print(json.dumps(rec), flush=True)
        summary = {"k": k}
        for name, recs in runs.items():
            summary[name] = dict(median_s=statistics.median(r["seconds"] for r in recs),
                                 runs_s=[round(r["seconds"], 2) for r in recs],
                                 iterations=recs[0]["iterations"], rel_gap=recs[0]["rel_gap"],
                                 certified=all(r["certified"] for r in recs),
                                 f=[s["f"] for s in recs[0]["solves"]],
                                 load=[round(r["load"], 2) for r in recs])
        if args.baseline:
            import numpy as np

            a = np.load(tmp / f"current_{k}.npy")
            b = np.load(tmp / f"baseline_{k}.npy")
            fa, fb = runs["current"][0]["solves"][-1], runs["baseline"][0]["solves"][-1]
            summary["speedup"] = summary["baseline"]["median_s"] / summary["current"]["median_s"]
            # both certified: each f is within tol*f of f* (up to the feas_tol slack in totals)
            summary["rel_f_diff"] = (fa["f"] - fb["f"]) / fb["f"]
            summary["rounded_entries_differing"] = int((a != b).sum())
            summary["rounded_max_abs_diff"] = int(np.abs(a - b).max())
        print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
