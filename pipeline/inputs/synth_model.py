"""Distributions of the synthetic population (``pipeline/synth.py``): the numbers, in one place.

Sources for the calibration (shares are national 2020 unless said otherwise):
- blocks per block group: Rhode Island 2010 (median 27, 10% 12, 90% 56, max 234) —
  lognormal with median 27 and log-sd 0.6;
- populated block sizes: Rhode Island 2010 (log mean 3.5, log sd 1.1, ~30% of blocks empty);
- race/ethnicity: 2020 P.L. 94-171 national shares of Hispanic and 7 non-Hispanic groups;
- group quarters: ~2.5% of persons, type shares and typical facility sizes from the 2020 GQ counts
  (rounded); voting age ~77%.
Segregation is modelled as nested Dirichlet draws (county ← nation, tract ← county, block ←
tract) with small concentrations, so most areas are dominated by one or two groups and most
block × cell combinations are zero.
"""

from __future__ import annotations

import itertools

import numpy as np

PERSONS_PER_BLOCK_GROUP = 1380  # 331 M persons / 239,780 block groups (2020)
BLOCKS_PER_BG_MEDIAN = 27
BLOCKS_PER_BG_LOGSD = 0.6
BLOCKS_PER_BG_MAX = 999  # block codes are the BG digit + 3 digits
BG_WEIGHT_LOGSD = 0.45  # spread of block-group populations (RI 2010: 10%-90% = 700-2050)
COUNTY_WEIGHT_LOGSD = 0.25
BLOCK_POPULATED = 0.69  # share of blocks that may hold household persons (multinomial zeros add more)
BLOCK_WEIGHT_LOGSD = 0.95
GQ_SHARE = 0.025
VACANT_SHARE = 0.11  # vacant housing units per occupied unit (about 10% of all units vacant)
EMPTY_BLOCK_WITH_HOUSING = 0.12  # unpopulated blocks that still have (vacant) housing units

# Groups: Hispanic (any race), then the non-Hispanic single races and "two or more races".
GROUPS = ("hispanic", "white", "black", "aian", "asian", "nhpi", "other", "two")
GROUP_SHARES = np.array([0.187, 0.578, 0.121, 0.007, 0.059, 0.002, 0.005, 0.041])
CONCENTRATION = {"county": 5.0, "tract": 3.0, "block": 10.0}  # Dirichlet concentrations
# Share of each group that is 18 or over (weighted mean ~0.77).
GROUP_VOTING_AGE = np.array([0.67, 0.82, 0.75, 0.74, 0.79, 0.73, 0.72, 0.55])
VOTING_AGE_BLOCK_SD = 0.06

# GQ types 1..7: share of GQ persons, mean facility size, share 18 or over.
GQ_TYPE_SHARES = np.array([0.26, 0.02, 0.17, 0.03, 0.33, 0.05, 0.14])
GQ_FACILITY_SIZE = np.array([400.0, 30.0, 90.0, 40.0, 300.0, 500.0, 20.0])
GQ_VOTING_AGE = np.array([0.995, 0.25, 1.0, 0.85, 0.97, 0.98, 0.85])  # nursing: nobody under 18


def _combo_weights(propensity: np.ndarray, decay: float) -> np.ndarray:
    """Weights of the 63 CENRACE codes (Census order = combinations by size, then race order):
    product of per-race propensities times ``decay`` per race beyond the first."""
    w = []
    for k in range(1, 7):
        for combo in itertools.combinations(range(6), k):
            w.append(np.prod(propensity[list(combo)]) * decay ** (k - 1))
    return np.asarray(w)


def cenrace_distributions() -> np.ndarray:
    """float64 ``(8, 63)``: distribution of CENRACE codes (index = code - 1) within each group."""
    p = np.zeros((len(GROUPS), 63))
    for g in range(1, 7):  # non-Hispanic single races -> codes 1..6
        p[g, g - 1] = 1.0
    multi = _combo_weights(np.array([1.0, 0.45, 0.4, 0.4, 0.08, 0.5]), 0.5)
    multi[:6] = 0.0
    p[7] = multi / multi.sum()
    # Hispanic: mostly Some Other Race, White, or White + Some Other Race
    hisp = _combo_weights(np.array([1.0, 0.1, 0.12, 0.05, 0.02, 1.0]), 0.6)
    hisp[0] *= 1.6  # White alone
    hisp[5] *= 2.5  # Some Other Race alone
    p[0] = hisp / hisp.sum()
    return p


CENRACE_P = cenrace_distributions()


def nested_mix(rng: np.random.Generator, parent: np.ndarray, concentration: float) -> np.ndarray:
    """Dirichlet draws around parent mixes: ``parent`` float ``(n, 8)`` rows summing to 1 ->
    ``(n, 8)``. Rows whose gamma draws all underflow fall back to the parent's mix."""
    alpha = np.maximum(parent * concentration, 1e-4)
    g = rng.gamma(alpha)
    s = g.sum(axis=1, keepdims=True)
    bad = s[:, 0] <= 0
    out = np.divide(g, s, out=np.zeros_like(g), where=s > 0)
    out[bad] = parent[bad]
    return out


def blocks_per_bg(rng: np.random.Generator, n: int) -> np.ndarray:
    """int64 ``(n,)``: number of blocks in each of ``n`` block groups (RI-2010-like skew)."""
    x = rng.lognormal(np.log(BLOCKS_PER_BG_MEDIAN), BLOCKS_PER_BG_LOGSD, n)
    return np.clip(np.rint(x), 2, BLOCKS_PER_BG_MAX).astype(np.int64)


def split_tracts(rng: np.random.Generator, n_tracts: int, n_bg: int) -> np.ndarray:
    """int64 ``(n_tracts,)``: block groups per tract, each in 1..9, summing to ``n_bg``
    (``n_bg`` is first clipped into ``[n_tracts, 9 n_tracts]``)."""
    n_bg = int(np.clip(n_bg, n_tracts, 9 * n_tracts))
    per = 1 + rng.multinomial(n_bg - n_tracts, np.full(n_tracts, 1.0 / n_tracts))
    over = per - 9
    while (over > 0).any():  # move the excess of over-full tracts to the smallest ones
        excess = int(over[over > 0].sum())
        per = np.minimum(per, 9)
        for i in np.argsort(per, kind="stable")[:excess]:
            per[i] += 1
        over = per - 9
    return per.astype(np.int64)


def tract_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """int64 ``(n,)``: increasing 6-digit tract codes with gaps (0001xx, 0003xx, ...)."""
    step = 100 * rng.integers(1, 4, n)
    codes = np.cumsum(step)
    if codes[-1] > 999_999:
        codes = 100 * np.arange(1, n + 1)
    return codes.astype(np.int64)
