"""Statistical and exactness tests of the discrete Gaussian / Laplace samplers.

Oracle: the exact PMF computed with mpmath at 40 significant digits, independently of the
sampler's fixed-point tables. Goodness of fit: chi-square over bins built on the oracle (tails
pooled; every bin expects ≥ 5 draws, body bins ≥ n/100, a thin tail closed early where the next
value is 10× more likely), rejected at the level α = 1e-6, so a
correct sampler fails a given test with probability ≤ 1e-6 (the seeds are fixed, so each run is
deterministic). Power: the same test must reject deliberately broken samplers — σ off by 2%, a
biased sign (2% of positive draws negated) and a truncated tail (|x| > 3σ redrawn) — and the
non-central chi-square power of the first two alternatives, computed from their exact PMFs, is
asserted to be ≥ 0.999 at these sample sizes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from scipy import stats

from pipeline.model.design import discrete_gaussian_variance, theta_variance
from pipeline.privacy import cks
from pipeline.privacy.inversion import CdfBounds, TableSampler
from pipeline.privacy.randomness import seeded_source
from pipeline.privacy.samplers import (
    discrete_gaussian,
    discrete_laplace,
    discrete_laplace_variance,
    table_sampler,
)

ALPHA = 1e-6
SIGMA2S = [Fraction(1, 4), Fraction(1), Fraction(101, 10), Fraction(318, 100) ** 2, Fraction(1000),
           Fraction(10**6)]


# --------------------------------------------------------------------------------------
# oracle and test statistic


def oracle_pmf(family: str, param: Fraction, width: float = 14.0) -> tuple[int, np.ndarray]:
    """(lowest value, exact PMF over consecutive integers) to 40 digits; mass beyond < 1e-40."""
    with mpmath.workdps(40):
        v = mpmath.mpf(param.numerator) / param.denominator
        if family == "gaussian":
            m = int(width * math.sqrt(float(param))) + 12
            w = [mpmath.exp(-mpmath.mpf(x * x) / (2 * v)) for x in range(0, m + 1)]
        else:
            m = int(95 * float(param)) + 12
            w = [mpmath.exp(-mpmath.mpf(x) / v) for x in range(0, m + 1)]
        z = w[0] + 2 * mpmath.fsum(w[1:])
        half = np.array([float(x / z) for x in w])
    return -m, np.concatenate([half[:0:-1], half])


def make_bins(pmf: np.ndarray, n: int, n_body: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Bin id of every support position and expected count per bin (tails pooled)."""
    target = max(5.0, n / n_body)
    bin_of = np.empty(pmf.size, dtype=np.int64)
    expected: list[float] = []
    acc, b = 0.0, 0
    for i, p in enumerate(pmf):
        bin_of[i] = b
        acc += p * n
        nxt = pmf[i + 1] * n if i + 1 < pmf.size else 0.0
        # close at the target size, or early when the next value alone is 10x bigger, so a
        # thin tail is not drowned in a big body bin (keeps power against truncated tails)
        if acc >= target or (acc >= 5 and nxt >= 10 * acc):
            expected.append(acc)
            acc, b = 0.0, b + 1
    if acc > 0 or not expected:
        if expected:  # merge the short last bin into the previous one
            bin_of[bin_of == b] = b - 1
            expected[-1] += acc
        else:
            expected.append(acc)
    return bin_of, np.array(expected)


def chi2_pvalue(x: np.ndarray, lo: int, pmf: np.ndarray) -> float:
    """Chi-square p-value of samples ``x`` against the PMF (values outside pooled into the ends)."""
    bin_of, expected = make_bins(pmf, x.size)
    pos = np.clip(x - lo, 0, pmf.size - 1)
    observed = np.bincount(bin_of[pos], minlength=expected.size).astype(np.float64)
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(stat, expected.size - 1))


def power(pmf_true: np.ndarray, pmf_alt: np.ndarray, n: int) -> float:
    """Power of the chi-square test (level ALPHA) against an alternative PMF (same support)."""
    bin_of, expected = make_bins(pmf_true, n)
    p0 = expected / n
    p1 = np.bincount(bin_of, weights=pmf_alt, minlength=expected.size)
    lam = n * float(((p1 - p0) ** 2 / p0).sum())
    df = expected.size - 1
    return float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam))


N = 1_000_000


# --------------------------------------------------------------------------------------
# the exact fast sampler


@pytest.mark.parametrize("sigma2", SIGMA2S, ids=lambda s: f"s2={float(s):g}")
def test_discrete_gaussian_matches_exact_pmf(sigma2: Fraction):
    lo, pmf = oracle_pmf("gaussian", sigma2)
    x = discrete_gaussian(sigma2, N, seeded_source(1234, "dg", str(sigma2)))
    assert x.dtype == np.int64 and x.shape == (N,)
    assert chi2_pvalue(x, lo, pmf) > ALPHA


@pytest.mark.parametrize("sigma2", [Fraction(1, 4), Fraction(101, 10), Fraction(1000)], ids=str)
def test_broken_samplers_are_rejected(sigma2: Fraction):
    lo, pmf = oracle_pmf("gaussian", sigma2)
    src = seeded_source(99, "broken", str(sigma2))
    # σ off by 2%: an exact sampler of the wrong distribution
    wide = sigma2 * Fraction(102, 100) ** 2
    lo_w, pmf_w = oracle_pmf("gaussian", wide)
    pmf_w = pmf_w[lo - lo_w: lo - lo_w + pmf.size]
    assert power(pmf, pmf_w, N) >= 0.999
    assert chi2_pvalue(discrete_gaussian(wide, N, src), lo, pmf) < ALPHA
    # biased sign: 2% of positive draws negated
    x = discrete_gaussian(sigma2, N, src)
    flip = (x > 0) & (np.arange(N) % 50 == 0)
    x[flip] = -x[flip]
    centre = -lo  # index of the value 0
    pos = np.flatnonzero(np.arange(pmf.size) > centre)
    pmf_b = pmf.copy()
    pmf_b[pos] -= 0.02 * pmf[pos]
    pmf_b[2 * centre - pos] += 0.02 * pmf[pos]
    assert power(pmf, pmf_b, N) >= 0.999
    assert chi2_pvalue(x, lo, pmf) < ALPHA
    # truncated tail: |x| > 3σ redrawn
    y = discrete_gaussian(sigma2, N, src)
    cut = int(3 * math.sqrt(float(sigma2)))
    bad = np.abs(y) > cut
    while bad.any():
        y[bad] = discrete_gaussian(sigma2, int(bad.sum()), src)
        bad = np.abs(y) > cut
    assert chi2_pvalue(y, lo, pmf) < ALPHA


def test_table_entries_are_exact_floors():
    # T_m = floor(2^63 C(m)) checked against an independent 60-digit mpmath computation
    for s2 in (Fraction(1, 4), Fraction(318, 100) ** 2, Fraction(7, 3)):
        ts = table_sampler("gaussian", s2)
        with mpmath.workdps(60):
            v = mpmath.mpf(s2.numerator) / s2.denominator
            m_max = int(40 * math.sqrt(float(s2))) + 20
            w = [mpmath.exp(-mpmath.mpf(x * x) / (2 * v)) for x in range(m_max)]
            z = w[0] + 2 * mpmath.fsum(w[1:])
            c = w[0]
            for m in range(ts.n_entries):
                if m:
                    c += 2 * w[m]
                assert int(ts.table[m]) == int(mpmath.floor(c / z * 2**63)), (s2, m)
        assert int(ts.table[-1]) == 2**63 - 1  # the table reaches the top: no draw falls beyond it


def test_guide_lookup_equals_plain_search():
    # the guide-table shortcut must give exactly the first k with T_k >= U (no ties here)
    for s2 in (Fraction(1), Fraction(1000), Fraction(10**6)):
        ts = table_sampler("gaussian", s2)
        u = seeded_source(8).uint64(200_000) >> np.uint64(1)
        near = ts.table[ts.table < np.uint64(2**63 - 1)][:50]
        u = np.concatenate([u, near + np.uint64(1), near - np.uint64(1)])
        assert np.array_equal(ts.magnitudes(u, seeded_source(9)), np.searchsorted(ts.table, u, side="left"))


def test_each_draw_is_its_word_inverted_with_its_low_bit_as_sign():
    # the draw of word w is ±(first k with T_k >= w >> 1), negative when w's lowest bit is set:
    # what keyed releases reproduce from their key, whatever shortcut sample() takes
    for s2 in (Fraction(1), Fraction(144), Fraction(7, 3)):
        ts = table_sampler("gaussian", s2)
        w = seeded_source(10, str(s2)).uint64(300_000)
        m = np.searchsorted(ts.table, w >> np.uint64(1), side="left").astype(np.int64)
        want = np.where((w & np.uint64(1)) == 1, -m, m)
        assert np.array_equal(ts.sample(w.size, seeded_source(10, str(s2))), want)


def test_cdf_bounds_bracket_the_truth():
    for fam, par in (("gaussian", Fraction(10)), ("laplace", Fraction(5, 2))):
        b = CdfBounds(fam, par, 100)
        z_lo, z_hi = b.z()
        lo, pmf = oracle_pmf(fam, par)
        with mpmath.workdps(50):
            for m in (0, 1, 5, 20):
                s_lo, s_hi = b.s(m)
                c_true = mpmath.fsum(pmf[-lo - m: -lo + m + 1].tolist())
                assert mpmath.mpf(s_lo) / z_hi <= c_true + 1e-15
                assert mpmath.mpf(s_hi) / z_lo >= c_true - 1e-15
                assert (s_hi - s_lo) < 2**40 and z_hi - z_lo < 2**40  # tight: ~2^-60 relative


def test_exact_resolution_path_is_exercised_and_correct():
    # 6-bit table truncated at 3 entries: a large share of draws go through the exact
    # big-integer resolution (ties T_k == U and draws beyond the table); the law must not change
    for s2 in (Fraction(1), Fraction(7, 3)):
        ts = TableSampler("gaussian", s2, bits=6, max_entries=3)
        n = 200_000
        x = ts.sample(n, seeded_source(5, "resolve", str(s2)))
        assert ts.resolved_draws > n // 50
        lo, pmf = oracle_pmf("gaussian", s2)
        assert chi2_pvalue(x, lo, pmf) > ALPHA
    ts = TableSampler("laplace", Fraction(3), bits=5, max_entries=4)
    x = ts.sample(100_000, seeded_source(6))
    assert ts.resolved_draws > 1000
    lo, pmf = oracle_pmf("laplace", Fraction(3))
    assert chi2_pvalue(x, lo, pmf) > ALPHA


@pytest.mark.parametrize("scale", [Fraction(1, 2), Fraction(3), Fraction(21, 2)], ids=str)
def test_discrete_laplace_matches_exact_pmf(scale: Fraction):
    lo, pmf = oracle_pmf("laplace", scale)
    x = discrete_laplace(scale, N, seeded_source(77, str(scale)))
    assert chi2_pvalue(x, lo, pmf) > ALPHA
    wrong = discrete_laplace(scale * Fraction(102, 100), N, seeded_source(78, str(scale)))
    assert chi2_pvalue(wrong, lo, pmf) < ALPHA
    # truncated tail: |x| > 5·scale (≥ 2) redrawn
    y = discrete_laplace(scale, N, seeded_source(79, str(scale)))
    cut = max(2, int(5 * scale))
    bad = np.abs(y) > cut
    while bad.any():
        y[bad] = discrete_laplace(scale, int(bad.sum()), seeded_source(80, str(int(bad.sum()))))
        bad = np.abs(y) > cut
    assert chi2_pvalue(y, lo, pmf) < ALPHA


# --------------------------------------------------------------------------------------
# CKS paths


@pytest.mark.parametrize("sigma2", [Fraction(1, 2), Fraction(7, 3), Fraction(100), Fraction(10**6)], ids=str)
def test_vectorised_cks_matches_exact_pmf(sigma2: Fraction):
    lo, pmf = oracle_pmf("gaussian", sigma2)
    x = discrete_gaussian(sigma2, 200_000, seeded_source(11, str(sigma2)), method="cks")
    assert chi2_pvalue(x, lo, pmf) > ALPHA


def test_bigint_paths_match_exact_pmf():
    lo, pmf = oracle_pmf("gaussian", Fraction(7, 3))
    x = discrete_gaussian(Fraction(7, 3), 20_000, seeded_source(12), method="bigint")
    assert chi2_pvalue(x, lo, pmf) > ALPHA
    lo, pmf = oracle_pmf("laplace", Fraction(5, 2))
    y = discrete_laplace(Fraction(5, 2), 20_000, seeded_source(13), method="bigint")
    assert chi2_pvalue(y, lo, pmf) > ALPHA


def test_huge_parameters_use_exact_big_integer_arithmetic():
    # σ² with a 60-digit denominator (tiny ρ with an awkward fraction) and σ ≈ 10^9
    s2 = Fraction(10**78 + 7, 10**60 + 3)
    assert not cks.vec_supported(s2)
    x = discrete_gaussian(s2, 200, seeded_source(14))
    assert x.dtype == np.int64
    sd = math.sqrt(float(s2))
    assert 0.5 * sd < x.std() < 1.5 * sd
    with pytest.raises(ValueError):
        discrete_gaussian(s2, 10, seeded_source(1), method="cks")


def test_argument_validation():
    with pytest.raises(TypeError, match="exact"):
        discrete_gaussian(1.5, 10, seeded_source(1))
    with pytest.raises(ValueError, match="> 0"):
        discrete_gaussian(Fraction(0), 10, seeded_source(1))
    with pytest.raises(ValueError, match="size"):
        discrete_gaussian(Fraction(1), -1, seeded_source(1))
    with pytest.raises(TypeError, match="RandomSource"):
        discrete_gaussian(Fraction(1), 3, np.random.default_rng(0))
    assert discrete_gaussian("7/3", 0, seeded_source(1)).shape == (0,)


# --------------------------------------------------------------------------------------
# variance


@pytest.mark.parametrize("sigma2", [Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(2),
                                    Fraction(101, 10), Fraction(50), Fraction(100), Fraction(1000),
                                    Fraction(10**6)], ids=str)
def test_variance_against_theta_identity(sigma2: Fraction):
    with mpmath.workdps(50):
        want = theta_variance(mpmath.mpf(sigma2.numerator) / sigma2.denominator)
        got = discrete_gaussian_variance(sigma2)
        assert abs(got - float(want)) <= 1e-13 * float(want)
        if sigma2 <= 1000:  # and against a direct sum at 50 digits
            v = mpmath.mpf(sigma2.numerator) / sigma2.denominator
            xs = range(1, int(45 * math.sqrt(float(sigma2))) + 12)
            e = [mpmath.exp(-mpmath.mpf(x * x) / (2 * v)) for x in xs]
            direct = 2 * mpmath.fsum(x * x * w for x, w in zip(xs, e)) / (1 + 2 * mpmath.fsum(e))
            assert abs(got - float(direct)) <= 1e-13 * float(direct)
    if sigma2 <= Fraction(1, 4):
        assert got < float(sigma2) * 0.9  # visibly below σ² for small σ


def test_laplace_variance_closed_form():
    lo, pmf = oracle_pmf("laplace", Fraction(3))
    x = np.arange(lo, lo + pmf.size)
    assert discrete_laplace_variance(Fraction(3)) == pytest.approx(float((pmf * x * x).sum()), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("sigma2", SIGMA2S, ids=lambda s: f"s2={float(s):g}")
def test_discrete_gaussian_big_sample(sigma2: Fraction):
    lo, pmf = oracle_pmf("gaussian", sigma2)
    x = discrete_gaussian(sigma2, 20_000_000, seeded_source(4321, str(sigma2)))
    assert chi2_pvalue(x, lo, pmf) > ALPHA
