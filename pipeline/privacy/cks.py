"""Canonne–Kamath–Steinke (2020) exact samplers: scalar big-integer and vectorised int64.

Algorithms 1–3 of CKS20 ("The Discrete Gaussian for Differential Privacy"): Bernoulli(exp(−γ))
for rational γ by the alternating-series trick, a discrete Laplace of integer scale t from a
uniform U < t accepted with Bernoulli(exp(−U/t)) plus t · Geometric(1 − e^{-1}), and the discrete
Gaussian N_Z(0, σ²) by rejection from a discrete Laplace of scale t = ⌊σ⌋ + 1 with acceptance
probability exp(−(|Y| − σ²/t)² / (2σ²)). Every Bernoulli(a/b) is "an exactly uniform integer in
[0, b) is < a", so only integer comparisons decide a sample.

- :func:`dgauss_scalar` / :func:`dlaplace_scalar`: one sample at a time over Python integers —
  exact for any rational parameter (the big-integer path, and the benchmark's scalar baseline).
- :func:`dgauss_vec`: numpy int64 vectorisation of the same algorithm (after ``dp-libraries.md``
  Appendix A). Where an intermediate would leave int64 (a huge proposal, a long alternating
  series), that element's *same* step is finished with Python integers, so no proposal is ever
  discarded because of its value and the output law is unchanged.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from pipeline.privacy.randomness import RandomSource

_LIM = 1 << 62


# --------------------------------------------------------------------------------------
# scalar, Python integers


def bernoulli_exp_scalar(num: int, den: int, source: RandomSource) -> bool:
    """Bernoulli(exp(−num/den)) for integers num ≥ 0, den ≥ 1 (CKS20 Alg. 1)."""
    while num > den:  # exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋)): peel off exp(-1) trials
        if not _bern_exp_le1_scalar(1, 1, source):
            return False
        num -= den
    return _bern_exp_le1_scalar(num, den, source)


def _bern_exp_le1_scalar(num: int, den: int, source: RandomSource) -> bool:
    """Bernoulli(exp(−num/den)) for 0 ≤ num ≤ den: K = first k with A_k = 0; return K odd."""
    k = 1
    while source.randbelow(den * k) < num:
        k += 1
    return k % 2 == 1


def _geometric_exp1_scalar(source: RandomSource) -> int:
    v = 0
    while _bern_exp_le1_scalar(1, 1, source):
        v += 1
    return v


def dlaplace_scalar(s: int, t: int, source: RandomSource) -> int:
    """Discrete Laplace with scale t/s (P(x) ∝ exp(−|x| s/t)), CKS20 Alg. 2, exact."""
    while True:
        u = source.randbelow(t)
        if not bernoulli_exp_scalar(u, t, source):
            continue
        x = u + t * _geometric_exp1_scalar(source)
        y = x // s
        neg = source.randbelow(2) == 1
        if neg and y == 0:
            continue
        return -y if neg else y


def dgauss_scalar(sigma2: Fraction, source: RandomSource) -> int:
    """One exact N_Z(0, σ²) draw, CKS20 Alg. 3, Python integers only."""
    p, q = sigma2.numerator, sigma2.denominator
    t = math.isqrt(p // q) + 1
    while True:
        y = dlaplace_scalar(1, t, source)
        # (|y| - σ²/t)² / (2σ²) = (|y| t q - p)² / (2 p q t²)
        if bernoulli_exp_scalar((abs(y) * t * q - p) ** 2, 2 * p * q * t * t, source):
            return y


# --------------------------------------------------------------------------------------
# vectorised int64


def _bern_exp_le1_vec(num: np.ndarray, den: int, source: RandomSource) -> np.ndarray:
    """Bernoulli(exp(−num_i/den)) for 0 ≤ num_i ≤ den < 2^56, vectorised; bool array."""
    n = num.shape[0]
    k = np.ones(n, dtype=np.int64)
    res = np.zeros(n, dtype=bool)
    active = np.arange(n)
    while active.size:
        big = den * k[active] >= _LIM
        if big.any():  # astronomically rare: finish those series with Python integers
            for i in active[big].tolist():
                kk = int(k[i])
                while source.randbelow(den * kk) < int(num[i]):
                    kk += 1
                res[i] = kk % 2 == 1
            active = active[~big]
            if not active.size:
                break
        succ = source.below(den * k[active]) < num[active]
        done = active[~succ]
        res[done] = (k[done] % 2) == 1
        active = active[succ]
        k[active] += 1
    return res


def _bern_exp_vec(num: np.ndarray, den: int, source: RandomSource) -> np.ndarray:
    """Bernoulli(exp(−num_i/den)) for num_i ≥ 0 (int64), den < 2^56."""
    out = np.ones(num.shape[0], dtype=bool)
    whole = num // den
    rem = num - whole * den
    idx = np.flatnonzero(whole > 0)
    left = whole[idx]
    while idx.size:  # ⌊γ⌋ independent Bernoulli(exp(-1)) trials, all must succeed
        ok = _bern_exp_le1_vec(np.ones(idx.size, dtype=np.int64), 1, source)
        out[idx[~ok]] = False
        idx, left = idx[ok], left[ok] - 1
        more = left > 0
        idx, left = idx[more], left[more]
    live = np.flatnonzero(out)
    if live.size:
        out[live] = _bern_exp_le1_vec(rem[live], den, source)
    return out


def _geometric_exp1_vec(n: int, source: RandomSource) -> np.ndarray:
    v = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        ok = _bern_exp_le1_vec(np.ones(active.size, dtype=np.int64), 1, source)
        v[active[ok]] += 1
        active = active[ok]
    return v


def _dlaplace_int_vec(n: int, t: int, source: RandomSource) -> np.ndarray:
    """n draws of the discrete Laplace of integer scale t (P(x) ∝ exp(−|x|/t)), int64."""
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        u = source.below(np.full(todo.size, t, dtype=np.int64))
        d = _bern_exp_vec(u, t, source)
        u, sel = u[d], todo[d]
        y = u + t * _geometric_exp1_vec(sel.size, source)
        neg = (source.uint64(sel.size) & np.uint64(1)).astype(bool)
        good = ~(neg & (y == 0))
        out[sel[good]] = np.where(neg, -y, y)[good]
        filled = np.zeros(n, dtype=bool)
        filled[sel[good]] = True
        todo = todo[~filled[todo]]
    return out


def vec_supported(sigma2: Fraction) -> bool:
    """True when the int64 vectorised path applies: den = 2 p q t² < 2^56 (then den·k, which
    grows by den per step of the alternating series, is caught at 2^62 before it can overflow)."""
    p, q = sigma2.numerator, sigma2.denominator
    t = math.isqrt(p // q) + 1
    return 2 * p * q * t * t < (1 << 56)


def dgauss_vec(size: int, sigma2: Fraction, source: RandomSource) -> np.ndarray:
    """``size`` exact N_Z(0, σ²) draws (int64) by vectorised CKS20; needs :func:`vec_supported`."""
    if not vec_supported(sigma2):
        raise ValueError(f"sigma2={sigma2} too large for the int64 CKS path; use the big-integer path")
    p, q = sigma2.numerator, sigma2.denominator
    t = math.isqrt(p // q) + 1
    den = 2 * p * q * t * t
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = _dlaplace_int_vec(todo.size, t, source)
        a = np.abs(y)
        acc = np.zeros(y.size, dtype=bool)
        lim = ((1 << 31) - p) // (t * q) if p < (1 << 31) else 0
        small = a < lim  # then | |y| t q - p | < 2^31 and its square fits int64
        gam = (a[small] * (t * q) - p) ** 2
        acc[small] = _bern_exp_vec(gam, den, source)
        for i in np.flatnonzero(~small).tolist():  # huge proposal: same test, Python ints
            acc[i] = bernoulli_exp_scalar((int(a[i]) * t * q - p) ** 2, den, source)
        out[todo[acc]] = y[acc]
        todo = todo[~acc]
    return out
