"""Hierarchical GLS (``pipeline/postprocess/gls.py``) on a synthetic state of ~1 M persons.

Tree shaped like a mid-size state: 1 nation root, 1 state, 28 counties, 239 tracts, 725 block
groups, 23,638 blocks (random uneven fan-outs, every parent >= 1 child); the pl94 spec and the
query sets and variances of ``census2020_pl94`` at every level; random measured values (the
cost does not depend on them). Reports wall seconds of the up pass, the down pass and the
estimates per level (change of basis back to cells), and the peak RSS (the per-answer
``detailed`` variances it also timed up to session 23 are no longer computed by the product). Last line: JSON summary.

    .venv/bin/python benchmarks/gls_state.py
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model.spec import load_spec  # noqa: E402
from pipeline.model.strategy import load_strategy  # noqa: E402
from pipeline.postprocess import gls  # noqa: E402

SIZES = (1, 1, 28, 239, 725, 23_638)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build(seed: int = 0) -> tuple[list[gls.LevelMeasurements], list[str]]:
    spec = load_spec("pl94")
    st = load_strategy("census2020_pl94")
    rng = np.random.default_rng(seed)
    levels = []
    for i, (name, n) in enumerate(zip(st.level_names, SIZES)):
        ptr = None
        if i:
            n_up = SIZES[i - 1]
            cuts = np.sort(rng.choice(np.arange(1, n), size=n_up - 1, replace=False))
            ptr = np.concatenate([[0], cuts, [n]]).astype(np.int64)
        meas = {q: (rng.normal(10.0, 5.0, size=(n, spec.query(q).n_answers)),
                    float(st.sigma2(name, q))) for q in st.queries(name)}
        levels.append(gls.LevelMeasurements(ptr, meas, name))
    return levels, list(st.level_names)


def main() -> None:
    spec = load_spec("pl94")
    levels, names = build()
    rss_inputs = _rss_mb()
    model = gls.GLSModel(spec, {q for lv in levels for q in lv.measured})
    t0 = time.perf_counter()
    up = model.upward(levels)
    t1 = time.perf_counter()
    res = model.downward(up)
    t2 = time.perf_counter()
    rss_fit = _rss_mb()
    per_level = {}
    for name, lf in zip(names, res.levels):
        a = time.perf_counter()
        est = lf.estimate
        b = time.perf_counter()
        per_level[name] = {"units": lf.n_units, "estimate_s": round(b - a, 3)}
        del est
    out = {"up_s": round(t1 - t0, 2), "down_s": round(t2 - t1, 2),
           "fit_s": round(t2 - t0, 2), "per_level": per_level,
           "peak_rss_mb_inputs": round(rss_inputs), "peak_rss_mb_fit": round(rss_fit),
           "peak_rss_mb": round(_rss_mb())}
    for k, v in out.items():
        print(k, v)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
