"""ε from the privacy-loss distribution (PLD) of the composed discrete Gaussian mechanisms.

Worst case under bounded neighbours: one person's record moves between two units of every
level and changes every query's answer, so each measured (level, query) with σ² = 1/ρ_q adds
*two* independent discrete Gaussians N_Z(·, σ²) whose means shift by 1. One such shift has
privacy loss L(x) = ln(P(x)/Q(x)) = (1 − 2x)/(2σ²) with x ~ N_Z(0, σ²) (the reverse direction
has the same law by the reflection x ↦ 1 − x), and the composed loss is the sum of the
independent L's. Then

    δ(ε) = E[(1 − e^{ε − L})₊] + P(L = +∞),

and we report the smallest ε on a 10⁻⁴ grid with δ(ε) ≤ δ.

Pessimistic discretisation (why the figure is an upper bound): shifts with the same σ² are
composed exactly on their own lattice, then every loss value is rounded *up* to the grid
``grid`` (a PLD whose losses are larger dominates the true one, so its δ(ε) is larger), and the
probability of |x| beyond the truncation point of each Gaussian (< 10⁻³⁰) is moved to L = +∞. The composition is a product of FFT spectra; to keep the tail that decides
δ(ε) accurate in floating point, every component is exponentially tilted by e^{λL} (λ chosen so
that the tilted mean sits near the answer), which the convolution preserves, and untilted in
log space afterwards. Floating-point error is then relative (~1e-12) in the region L > ε.
A slow test checks the figure against Google's ``dp_accounting`` PLD, which it must not undercut.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np

from pipeline.model.strategy import Strategy
from pipeline.privacy.accounting import EPS_GRID, as_fraction, cks_epsilon, round_up

TAIL_MASS = 1e-30
MAX_FFT = 1 << 24


def strategy_shifts(strategy: Strategy) -> Counter:
    """``{σ²: number of unit-sensitivity discrete-Gaussian shifts}`` of a worst-case neighbour:
    two per measured (level, query)."""
    out: Counter = Counter()
    for rho_q in strategy.rho_by_level_query().values():
        out[1 / rho_q] += 2
    return out


def _component(sigma2: Fraction, copies: int, grid: float) -> tuple[int, np.ndarray, float]:
    """Discretised loss PMF of ``copies`` unit shifts with the same σ²: (first grid index, pmf
    over consecutive grid indices, mass moved to +∞).

    The copies are composed exactly on their own lattice first — the summed loss is
    (copies − 2 Σx)/(2σ²) with Σx the ``copies``-fold convolution of the DG pmf — and only then
    rounded up to the grid, so the pessimism is one grid step per distinct σ², not per shift.
    Each x is truncated at ±k with P(|x| > k) < TAIL_MASS; that mass goes to +∞.
    """
    s2 = float(sigma2)
    s = math.sqrt(s2)
    k = int(math.ceil(s * math.sqrt(2 * math.log(1 / TAIL_MASS)))) + 2
    x = np.arange(-k, k + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2 * s2))
    pmf = w / w.sum()  # the normaliser's truncated part is < TAIL_MASS relative
    dist = pmf
    for _ in range(copies - 1):
        dist = np.convolve(dist, pmf)  # direct: relative accuracy in the tails
    sums = np.arange(-copies * k, copies * k + 1, dtype=np.float64)
    loss = (copies - 2 * sums) / (2 * s2)
    idx = np.ceil(loss / grid).astype(np.int64)  # round every loss up (pessimistic)
    lo = int(idx.min())
    out = np.zeros(int(idx.max()) - lo + 1)
    np.add.at(out, idx - lo, np.clip(dist, 0.0, None))
    return lo, out, 1.0 - (1.0 - TAIL_MASS) ** copies


def composed_dg_delta_curve(shifts: dict[Fraction, int], grid: float, tilt: float
                            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Composed loss PMF: (loss values (grid points), log-probabilities, mass at +∞)."""
    comps = []
    lo_total, length, p_inf_keep = 0, 1, 1.0
    for s2, c in sorted(shifts.items()):
        lo, pmf, tail = _component(Fraction(s2), c, grid)
        comps.append((pmf, lo))
        lo_total += lo
        length += pmf.size - 1
        p_inf_keep *= 1 - tail
    n = 1 << (length - 1).bit_length()
    if n > MAX_FFT:
        raise ValueError(f"PLD grid too fine for this strategy ({length} points); use a coarser grid")
    spec_total = np.ones(n // 2 + 1, dtype=np.complex128)
    log_norm = 0.0
    for pmf, lo in comps:
        loss = (lo + np.arange(pmf.size)) * grid
        with np.errstate(divide="ignore"):
            lt = np.log(pmf) + tilt * loss
        m = lt.max()
        tilted = np.exp(lt - m)
        s = tilted.sum()
        log_norm += m + math.log(s)
        spec_total *= np.fft.rfft(tilted / s, n)
    dens = np.fft.irfft(spec_total, n)[:length]
    dens = np.clip(dens, 0.0, None)
    loss = (lo_total + np.arange(length)) * grid
    with np.errstate(divide="ignore"):
        logp = np.log(dens) - tilt * loss + log_norm
    return loss, logp, 1.0 - p_inf_keep


def _delta_at(eps: float, loss: np.ndarray, logp: np.ndarray, p_inf: float) -> float:
    sel = loss > eps
    return float(np.sum(np.exp(logp[sel]) * -np.expm1(eps - loss[sel]))) + p_inf


def composed_dg_epsilon(shifts: dict[Fraction, int], delta: float | str | Fraction = "1e-10",
                        grid: float = 1e-3) -> Fraction:
    """Smallest ε (rounded up to 10⁻⁴) with δ(ε) ≤ δ for the composition of unit-sensitivity
    discrete Gaussian shifts ``{σ²: count}``, by the pessimistic PLD above."""
    d = float(as_fraction(delta))
    rho = sum((Fraction(c, 2) / Fraction(s2) for s2, c in shifts.items()), Fraction(0))
    hint = float(cks_epsilon(rho, delta))
    r = float(rho)
    tilt = min(max(0.0, (hint - r) / (2 * r)), 200.0)
    loss, logp, p_inf = composed_dg_delta_curve(shifts, grid, tilt)
    if p_inf > d:
        raise ValueError(f"PLD truncation mass {p_inf} exceeds delta {d}")
    lo, hi = 0.0, hint + 1.0
    while _delta_at(hi, loss, logp, p_inf) > d:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _delta_at(mid, loss, logp, p_inf) <= d:
            hi = mid
        else:
            lo = mid
    return round_up(Fraction(hi), EPS_GRID)


def strategy_pld_epsilon(strategy: Strategy, delta: float | str | Fraction = "1e-10",
                         grid: float = 1e-3) -> Fraction:
    """PLD ε of a whole strategy (worst-case neighbour: every query of every level changes)."""
    return composed_dg_epsilon(strategy_shifts(strategy), delta, grid)
