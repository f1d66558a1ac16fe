"""The measurement design: strategy × spec → one :class:`Measurement` per (kind, level, query).

A strategy states ρ per (level, query); the design turns it into what every consumer needs —
σ² = 1/ρ of the discrete Gaussian, its exact variance (the engine's weight 1/variance, the
margins of error, the review's WLS comparator) — computed once, here. The measurement stage
writes σ² and the variance into each measurement file from these records; publishing reads
the variances for margins of error from the same records.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from pipeline.model.strategy import Strategy


@dataclass(frozen=True)
class Measurement:
    """One noisy query of one level of one run kind.

    ``rho``: its zCDP share (exact); ``sigma2``: σ² = 1/ρ (exact, counts²); ``variance``: the
    exact variance of N_Z(0, σ²) as the nearest float (counts², below σ²).
    """

    kind: str
    level: str
    query: str
    rho: Fraction
    sigma2: Fraction
    variance: float


@dataclass(frozen=True)
class Design:
    """Every measurement of a run, in strategy order."""

    measurements: tuple[Measurement, ...]

    def variances(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{kind: {level: {query: exact variance}}}`` (counts²), for margins of error."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for m in self.measurements:
            out.setdefault(m.kind, {}).setdefault(m.level, {})[m.query] = m.variance
        return out


def normal_matrix(answers: Mapping[str, np.ndarray], weights: Mapping[str, Any]) -> np.ndarray:
    """``H = Σ_q Q_qᵀ diag(w_q) Q_q`` on n cells: float64 ``(n, n)``.

    ``answers[q]``: the answer index of each of the n cells under query q, int ``(n,)`` (a
    query is a partition of the cells, so ``Q_qᵀ Q_q`` is 1 exactly where two cells share an
    answer); ``weights[q]``: 1/variance (1/counts²), a scalar or one weight per answer. The one
    normal matrix of the design: the engine's x-step, the margins of error and the review's
    WLS comparator all build it here.
    """
    n = len(next(iter(answers.values()))) if answers else 0
    h = np.zeros((n, n), dtype=np.float64)
    for q, ans in answers.items():
        ans = np.asarray(ans)
        same = ans[:, None] == ans[None, :]
        w = weights[q]
        if np.ndim(w) == 0:
            h += same * float(w)
        else:
            h += np.where(same, np.asarray(w, dtype=np.float64)[ans][:, None], 0.0)
    return h


def measurement(kind: str, level: str, query: str, rho: Fraction) -> Measurement:
    """The record of one query measured with zCDP share ``rho``."""
    sigma2 = 1 / Fraction(rho)
    return Measurement(kind, level, query, Fraction(rho), sigma2, discrete_gaussian_variance(sigma2))


def design(strategies: Mapping[str, Strategy]) -> Design:
    """The design of a run from its strategies ``{kind: Strategy}``."""
    return Design(tuple(measurement(kind, lv, q, rho)
                        for kind, s in strategies.items()
                        for (lv, q), rho in s.rho_by_level_query().items()))


def design_from_rho(rho_by_kind: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Design:
    """The design from a release manifest's ``{kind: {level: {query: ρ text}}}``."""
    return Design(tuple(measurement(kind, lv, q, Fraction(str(r)))
                        for kind, levels in rho_by_kind.items()
                        for lv, qs in levels.items() for q, r in qs.items()))


@functools.lru_cache(maxsize=4096)
def discrete_gaussian_variance(sigma2: Fraction | int | str) -> float:
    """Exact variance of N_Z(0, σ²) as the nearest float (counts²).

    Σ x² e^{−x²/2σ²} / Σ e^{−x²/2σ²} summed over the support at 40 significant digits (terms
    beyond 40σ are below e^{−800}); for σ² > 100 the equivalent theta-function (Poisson
    summation) form σ² Σ_k (1 − 4π²k²σ²) e^{−2π²k²σ²} / Σ_k e^{−2π²k²σ²}, which converges in a
    handful of terms there. It is below σ² (visibly so for σ < 1) and is what post-processing
    uses as the weight 1/variance.
    """
    import mpmath

    s2 = Fraction(sigma2)
    if isinstance(sigma2, float) or s2 <= 0:
        raise ValueError(f"sigma2 must be a positive exact rational, got {sigma2!r}")
    with mpmath.workdps(40):
        v = mpmath.mpf(s2.numerator) / s2.denominator
        if s2 <= 100:
            n_max = int(40 * float(s2) ** 0.5) + 10
            num = den = mpmath.mpf(0)
            for x in range(1, n_max + 1):
                e = mpmath.exp(-mpmath.mpf(x * x) / (2 * v))
                num += x * x * e
                den += e
            return float(2 * num / (1 + 2 * den))
        return float(theta_variance(v))


def theta_variance(v: Any) -> Any:
    """Discrete-Gaussian variance at σ² = v (mpmath number) by Poisson summation (independent
    formula used by :func:`discrete_gaussian_variance` for large σ² and by the tests)."""
    import mpmath

    num = den = mpmath.mpf(1)  # the k = 0 term
    for k in range(1, 10_000):
        a = 2 * mpmath.pi ** 2 * k * k * v
        e = mpmath.exp(-a)
        num += 2 * (1 - 2 * a) * e
        den += 2 * e
        if e < mpmath.mpf(10) ** (-mpmath.mp.dps - 5):
            break
    return v * num / den
