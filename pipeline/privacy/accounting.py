"""Exact privacy budgets: strategies as data, ρ per (level, query), ρ → (ε, δ).

Budgets are ``fractions.Fraction`` end to end (ARCHITECTURE §4):

    ρ_q = global ρ × level share × query share,    σ²_q = 1 / ρ_q.

Neighbouring datasets differ in one person's record (bounded DP). Every query is a marginal (a
partition of the cells), so changing one record moves one answer down by one and another up by
one: the squared L2 sensitivity is 2 and discrete Gaussian noise of variance σ² gives
``2 / (2 σ²) = 1/σ²``-zCDP. Hence σ² = 1/ρ_q exactly. zCDP composes by addition, so the total is
the sum of the ρ_q, which equals the global ρ because the shares sum to exactly one.

The conversion to (ε, δ) uses Canonne, Kamath & Steinke (2020), Corollary 13: a ρ-zCDP
mechanism is (ε, δ)-DP for every α > 1 with

    ε = α ρ + (ln(1/δ) + (α − 1) ln(1 − 1/α) − ln α) / (α − 1).

Any α > 1 gives a valid bound, so we optimise α in floating point and then *evaluate* the bound
at that α with rigorous interval arithmetic (mpmath ``iv``) and round the upper end up to the
reporting grid: the reported ε is never below the true bound.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

#: reported ε values are rounded up to a multiple of this
EPS_GRID = Fraction(1, 10_000)


# --------------------------------------------------------------------------------------
# ρ -> (ε, δ)


def as_fraction(x: float | str | Fraction) -> Fraction:
    """Exact rational of a δ or ρ given as text, Fraction or float (a float via its shortest repr)."""
    return x if isinstance(x, Fraction) else Fraction(str(x))


def round_up(x: Fraction, grid: Fraction = EPS_GRID) -> Fraction:
    """Smallest multiple of ``grid`` that is ≥ ``x``."""
    return math.ceil(x / grid) * grid


def _iv_upper(x: Any) -> Fraction:
    """Exact rational upper end of an mpmath interval."""
    from mpmath.libmp import to_rational

    return Fraction(*to_rational(x._mpi_[1]))


def _cks_eps_at(rho: Fraction, delta: Fraction, alpha: Fraction, prec: int = 200) -> Fraction:
    """Rigorous upper bound on the CKS20 Cor. 13 ε at one α > 1 (interval arithmetic)."""
    from mpmath import iv

    old = iv.prec
    iv.prec = prec
    try:
        a = iv.mpf(alpha.numerator) / alpha.denominator
        r = iv.mpf(rho.numerator) / rho.denominator
        d = iv.mpf(delta.numerator) / delta.denominator
        e = a * r + (-iv.log(d) + (a - 1) * iv.log(1 - 1 / a) - iv.log(a)) / (a - 1)
        return _iv_upper(e)
    finally:
        iv.prec = old


def cks_epsilon(rho: Fraction | str, delta: float | str | Fraction = "1e-10") -> Fraction:
    """ε of a ρ-zCDP mechanism at δ by CKS20 Corollary 13, rounded *up* to :data:`EPS_GRID`.

    ``rho`` and ``delta`` are exact rationals (floats are read through their shortest repr).
    Reference: ρ = 293764/114921, δ = 1e-10 → 17.1436 (the certified 2020 persons ε ≈ 17.14).
    """
    rho, delta = as_fraction(rho), as_fraction(delta)
    if rho <= 0 or not (0 < delta < 1):
        raise ValueError(f"need rho > 0 and 0 < delta < 1, got rho={rho}, delta={delta}")
    r, ld = float(rho), math.log(1 / float(delta))

    def eps(a: float) -> float:
        return a * r + (ld + (a - 1) * math.log1p(-1 / a) - math.log(a)) / (a - 1)

    # ε(α) is convex on α > 1: golden-section search on log(α - 1)
    lo, hi = -30.0, 30.0
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if eps(1 + math.exp(m1)) < eps(1 + math.exp(m2)):
            hi = m2
        else:
            lo = m1
    alpha = Fraction(1 + math.exp((lo + hi) / 2)).limit_denominator(10**12)
    if alpha <= 1:
        alpha = Fraction(1) + Fraction(1, 10**12)
    return round_up(_cks_eps_at(rho, delta, alpha))


def loose_epsilon(rho: Fraction | str, delta: float | str | Fraction = "1e-10") -> Fraction:
    """The textbook bound ρ + 2√(ρ ln(1/δ)) rounded up to :data:`EPS_GRID` (for comparison)."""
    from mpmath import iv

    rho, delta = as_fraction(rho), as_fraction(delta)
    old = iv.prec
    iv.prec = 200
    try:
        r = iv.mpf(rho.numerator) / rho.denominator
        d = iv.mpf(delta.numerator) / delta.denominator
        return round_up(_iv_upper(r + 2 * iv.sqrt(r * -iv.log(d))))
    finally:
        iv.prec = old
