"""Samples per CPU-second of the discrete Gaussian samplers, measured in one run.

For σ ∈ {1, 3.18, 10, 100, 1000} (σ² = σ exactly as a decimal fraction, squared):

- ``exact_table``: ``discrete_gaussian`` (exact table inversion) fed by ``secure_source()``;
- ``exact_cks_vec``: the vectorised int64 CKS20 rejection sampler, same source;
- ``scalar_cks``: the scalar pure-Python exact CKS20 (Python integers, one draw at a time, the
  2020 Census style), fed by ``random.SystemRandom`` (os.urandom);
- ``rint_normal``: the *inexact* ``np.rint(rng.normal(0, σ))`` with numpy PCG64 (the baseline).

Figures are CPU time (``time.process_time``, single thread), median of ``--repeats`` runs, so
they are per-core throughput on a shared machine. The last line printed is JSON.

    .venv/bin/python benchmarks/samplers.py [--n 10000000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.privacy import cks  # noqa: E402
from pipeline.privacy.randomness import RandomSource, secure_source  # noqa: E402
from pipeline.privacy.samplers import discrete_gaussian, table_sampler  # noqa: E402

SIGMAS = ("1", "3.18", "10", "100", "1000")


class SystemRandomSource(RandomSource):
    """Scalar source for the pure-Python baseline: ``random.SystemRandom`` (os.urandom)."""

    kind = "secure"

    def __init__(self) -> None:
        super().__init__()
        self._r = random.SystemRandom()

    def randbelow(self, n: int) -> int:
        return self._r.randrange(n)

    def getrandbits(self, k: int) -> int:
        return self._r.getrandbits(k)


def rate(fn, n: int, repeats: int) -> float:
    """Median samples per CPU-second of ``fn(n)`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn(n)
        times.append(time.process_time() - t)
    return n / max(statistics.median(times), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="draws per timed run (vectorised samplers)")
    ap.add_argument("--n-cks", type=int, default=1_000_000, help="draws per run, vectorised CKS")
    ap.add_argument("--n-scalar", type=int, default=20_000, help="draws per run, scalar CKS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10x fewer draws (make bench)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_cks, args.n_scalar = args.n // 10, args.n_cks // 5, args.n_scalar // 5
    src = secure_source()
    rng = np.random.default_rng(12345)
    sysrand = SystemRandomSource()
    results = {"n": args.n, "repeats": args.repeats, "unit": "samples per CPU-second", "sigma": {}}
    words = rate(lambda n: src.uint64(n), args.n, args.repeats)
    results["aes_ctr_uint64_per_s"] = round(words)
    print(f"AES-CTR keystream: {words / 1e6:.0f} M uint64/s")
    print(f"{'sigma':>6} {'table':>6} {'exact table':>14} {'exact CKS vec':>14} {'scalar CKS':>12} "
          f"{'rint(normal)':>14} {'rint/exact':>10} {'exact/scalar':>12}")
    for s in SIGMAS:
        s2 = Fraction(s) ** 2
        sd = float(s)
        build = time.process_time()
        entries = table_sampler("gaussian", s2).n_entries
        build = time.process_time() - build
        exact = rate(lambda n: discrete_gaussian(s2, n, src), args.n, args.repeats)
        vec = rate(lambda n: discrete_gaussian(s2, n, src, method="cks"), args.n_cks, args.repeats)
        scalar = rate(lambda n: [cks.dgauss_scalar(s2, sysrand) for _ in range(n)], args.n_scalar, args.repeats)
        inexact = rate(lambda n: np.rint(rng.normal(0.0, sd, n)).astype(np.int64), args.n, args.repeats)
        results["sigma"][s] = {"table_entries": entries, "table_build_s": round(build, 4),
                               "exact_table": round(exact), "exact_cks_vec": round(vec),
                               "scalar_cks": round(scalar), "rint_normal": round(inexact),
                               "rint_over_exact": round(inexact / exact, 2),
                               "exact_over_scalar": round(exact / scalar)}
        print(f"{s:>6} {entries:>6} {exact / 1e6:>12.1f} M {vec / 1e6:>12.2f} M {scalar / 1e3:>10.1f} k "
              f"{inexact / 1e6:>12.1f} M {inexact / exact:>10.2f} {exact / scalar:>12.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
