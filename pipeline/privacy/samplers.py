"""Exact discrete Gaussian and discrete Laplace noise over numpy int64 arrays.

Guarantee: ``discrete_gaussian(σ², n, source)`` returns ``n`` independent draws distributed
*exactly* as N_Z(0, σ²) (P(x) ∝ exp(−x²/(2σ²)) on the integers) for any positive rational σ²,
given uniform random bits from ``source``; it raises only on bad arguments. The same holds for
``discrete_laplace(s, n, source)`` with P(x) ∝ exp(−|x|/s). No floating-point number decides a
sample.

Routes (chosen by ``method="auto"``):

- ``"table"`` (default whenever the table has ≤ 2^20 entries, i.e. σ up to ~10^5): inversion of
  an exact 63-bit table of the CDF with an exact resolution of the rare boundary draws — see the
  exactness argument in :mod:`pipeline.privacy.inversion`. One 64-bit word per sample.
- ``"cks"``: CKS20 rejection vectorised in int64 (:mod:`pipeline.privacy.cks`), where
  ``2 p q t² < 2^56``.
- ``"bigint"``: the scalar CKS20 algorithm over Python integers — every rational parameter,
  however large its numerator or denominator, slow.

Tables are cached per (family, parameter).
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np

from pipeline.privacy import cks
from pipeline.privacy.inversion import MAX_TABLE_ENTRIES, TableSampler, _table_entries_estimate
from pipeline.privacy.randomness import RandomSource, resolve_source

METHODS = ("auto", "table", "cks", "bigint")


def exact_parameter(x: Fraction | int | str, what: str) -> Fraction:
    """A positive exact rational from a Fraction, int or text; floats are refused."""
    if isinstance(x, float) or isinstance(x, bool):
        raise TypeError(f"{what} must be an exact Fraction, int or text, not {type(x).__name__} {x!r}")
    try:
        f = Fraction(x)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{what}: not an exact rational: {x!r} ({exc})") from None
    if f <= 0:
        raise ValueError(f"{what} must be > 0, got {f}")
    return f


@functools.lru_cache(maxsize=512)
def table_sampler(family: str, param: Fraction) -> TableSampler:
    """The cached exact table sampler for ``family`` ("gaussian"/"laplace") and parameter."""
    return TableSampler(family, param)


def _table_ok(family: str, param: Fraction) -> bool:
    return _table_entries_estimate(family, param) <= MAX_TABLE_ENTRIES


def discrete_gaussian(sigma2: Fraction | int | str, size: int,
                      source: RandomSource | None = None, method: str = "auto") -> np.ndarray:
    """``size`` exact draws of N_Z(0, σ²) as int64, shape ``(size,)``; σ² in counts².

    ``source`` defaults to a fresh :func:`~pipeline.privacy.randomness.secure_source`.
    """
    s2 = exact_parameter(sigma2, "sigma2")
    size = _check_size(size)
    src = resolve_source(source)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "table" if _table_ok("gaussian", s2) else ("cks" if cks.vec_supported(s2) else "bigint")
    if method == "table":
        return table_sampler("gaussian", s2).sample(size, src)
    if method == "cks":
        return cks.dgauss_vec(size, s2, src)
    return np.array([cks.dgauss_scalar(s2, src) for _ in range(size)], dtype=np.int64)


def discrete_laplace(scale: Fraction | int | str, size: int,
                     source: RandomSource | None = None, method: str = "auto") -> np.ndarray:
    """``size`` exact draws with P(x) ∝ exp(−|x|/scale) on the integers, int64 ``(size,)``."""
    s = exact_parameter(scale, "scale")
    size = _check_size(size)
    src = resolve_source(source)
    if method not in METHODS or method == "cks":
        raise ValueError(f"discrete_laplace method must be auto, table or bigint, got {method!r}")
    if method == "auto":
        method = "table" if _table_ok("laplace", s) else "bigint"
    if method == "table":
        return table_sampler("laplace", s).sample(size, src)
    # scale t/s' in CKS Alg. 2 notation: t = numerator, s' = denominator
    return np.array([cks.dlaplace_scalar(s.denominator, s.numerator, src) for _ in range(size)],
                    dtype=np.int64)


def _check_size(size: int) -> int:
    size = int(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return size


def discrete_laplace_variance(scale: Fraction | int | str) -> float:
    """Exact variance 2r/(1 − r)² of the discrete Laplace with r = exp(−1/scale) (counts²)."""
    import mpmath

    s = exact_parameter(scale, "scale")
    with mpmath.workdps(40):
        r = mpmath.exp(-mpmath.mpf(s.denominator) / s.numerator)
        return float(2 * r / (1 - r) ** 2)
