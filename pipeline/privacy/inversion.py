"""Exact table-inversion sampler for the magnitude of a discrete Gaussian or discrete Laplace.

The distributions
-----------------
Both families are symmetric on the integers. With a rational parameter ``p/q``:

- discrete Gaussian N_Z(0, σ²), σ² = p/q:   P(X = x) ∝ e_|x|,  e_m = exp(−m² q / (2p));
- discrete Laplace  L_Z(0, s),  s = p/q:    P(X = x) ∝ e_|x|,  e_m = exp(−m q / p).

The magnitude M = |X| has weights w_0 = 1, w_m = 2 e_m (m ≥ 1), normaliser Z = Σ w_m and CDF
C(m) = S_m / Z with S_m = Σ_{j≤m} w_j. X = M with a fair random sign (the sign of 0 is
irrelevant), which is exactly the symmetric law.

Exactness argument
------------------
1. *Rigorous bounds.* :class:`CdfBounds` computes integers ``S_lo ≤ 2^P S_m ≤ S_hi`` and
   ``Z_lo ≤ 2^P Z ≤ Z_hi`` in fixed point with P bits: ``exp(−q/(2p))``, ``exp(−q/p)`` are
   enclosed by mpmath interval arithmetic (directed rounding), the recurrences
   e_m = e_{m−1} g_m, g_m = g_{m−1} exp(−q/p) (Gaussian; g_1 = exp(−q/(2p))) or e_m = e_{m−1} r
   (Laplace) are run twice, rounding every product down (``lo``) or up (``hi``); all factors are
   positive so the two runs bracket the truth. The tail of Z beyond N terms is bounded above by
   (σ²/N) e_N (Gaussian: the sum is below ∫_N^∞ exp(−t²/2σ²) dt, then the Mills bound) or by
   e_N r/(1 − r) (Laplace: a geometric series), and below by 0. Hence
   C(m) ∈ [S_lo/Z_hi, S_hi/Z_lo].
2. *Table.* With b = 63 bits, T_m = ⌊2^b C(m)⌋ is taken only when ⌊2^b S_lo/Z_hi⌋ equals
   ⌊2^b S_hi/Z_lo⌋; otherwise the table is rebuilt at twice the precision. So every T_m is the
   exact floor.
3. *Inversion.* A uniform V on [0, 1) gives M = min{m : V < C(m)}, which has
   P(M = m) = C(m) − C(m−1): the exact law. We draw V lazily: U = the first b bits, so
   V ∈ [U, U + 1)/2^b. Let k be the first index with T_k ≥ U. Then T_{k−1} < U implies
   2^b C(k−1) < T_{k−1} + 1 ≤ U, i.e. C(k−1) < V; and if T_k > U then 2^b C(k) ≥ T_k ≥ U + 1,
   i.e. V < C(k): the output k is decided by the integer comparison alone.
4. *Rare draws.* When T_k = U (or U lies beyond a truncated table) the draw is finished by
   :meth:`TableSampler._resolve`: more random bits are appended to V (an interval [A, A+1)/2^L
   that always contains V) and compared with the rigorous enclosures of C(m) at a precision
   above L, again by integer comparisons: m is increased while V ≥ C(m) is certain, returned
   when V < C(m) is certain, and bits/precision are added while undecided. This terminates with
   probability 1 and returns exactly min{m : V < C(m)}.

So every output is distributed exactly as the target law, assuming uniform random bits; no
floating-point number decides any sample. The only floats are in choosing table sizes.
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.privacy.randomness import RandomSource

TABLE_BITS = 63
GUIDE_BITS = 16
#: largest table we build (entries); beyond it the samplers use CKS rejection instead
MAX_TABLE_ENTRIES = 1 << 20


def _fixed(x_mpi_end: Any, prec: int, up: bool) -> int:
    """Exact floor (``up=False``) or ceil of ``2^prec · x`` for an mpmath raw mpf endpoint."""
    from mpmath.libmp import to_man_exp

    man, exp = to_man_exp(x_mpi_end, signed=True)
    shift = exp + prec
    if shift >= 0:
        return man << shift
    return -((-man) >> -shift) if up else man >> -shift


def _exp_neg_bounds(num: int, den: int, prec: int) -> tuple[int, int]:
    """Integers lo ≤ 2^prec · exp(−num/den) ≤ hi (mpmath interval arithmetic)."""
    from mpmath import iv

    old = iv.prec
    iv.prec = prec + 40
    try:
        x = iv.exp(-(iv.mpf(num) / den))
    finally:
        iv.prec = old
    return _fixed(x._mpi_[0], prec, up=False), _fixed(x._mpi_[1], prec, up=True)


def _mul_lo(a: int, b: int, prec: int) -> int:
    return (a * b) >> prec


def _mul_hi(a: int, b: int, prec: int) -> int:
    return -((-(a * b)) >> prec)


class CdfBounds:
    """Rigorous fixed-point (``prec`` bits) bounds on S_m and Z of a magnitude law.

    ``family`` is ``"gaussian"`` (param σ²) or ``"laplace"`` (param scale); ``param`` a
    positive Fraction. ``s(m)`` → ``(S_lo, S_hi)``; ``z()`` → ``(Z_lo, Z_hi)``; both scaled by 2^prec.
    """

    def __init__(self, family: str, param: Fraction, prec: int) -> None:
        if family not in ("gaussian", "laplace"):
            raise ValueError(f"unknown family {family!r}")
        if param <= 0:
            raise ValueError(f"parameter must be > 0, got {param}")
        self.family, self.param, self.prec = family, Fraction(param), prec
        p, q = self.param.numerator, self.param.denominator
        if family == "gaussian":
            self._g1 = _exp_neg_bounds(q, 2 * p, prec)   # exp(-q/(2p))
            self._r = _exp_neg_bounds(q, p, prec)        # exp(-q/p)
        else:
            self._r = _exp_neg_bounds(q, p, prec)        # exp(-q/p)
        self._s_lo: list[int] = []
        self._s_hi: list[int] = []
        self._gen = self.partial_sums()
        self._z: tuple[int, int] | None = None

    def terms(self) -> Iterator[tuple[int, int]]:
        """Yield (e_lo, e_hi) for m = 0, 1, 2, … (fixed point)."""
        P = self.prec
        one = 1 << P
        e_lo = e_hi = one
        yield e_lo, e_hi
        r_lo, r_hi = self._r
        if self.family == "gaussian":
            g_lo, g_hi = self._g1
            while True:
                e_lo, e_hi = _mul_lo(e_lo, g_lo, P), _mul_hi(e_hi, g_hi, P)
                yield e_lo, e_hi
                g_lo, g_hi = _mul_lo(g_lo, r_lo, P), _mul_hi(g_hi, r_hi, P)
        else:
            while True:
                e_lo, e_hi = _mul_lo(e_lo, r_lo, P), _mul_hi(e_hi, r_hi, P)
                yield e_lo, e_hi

    def partial_sums(self) -> Iterator[tuple[int, int, int]]:
        """Yield (S_lo, S_hi, e_hi) for m = 0, 1, 2, …"""
        s_lo = s_hi = 0
        for m, (e_lo, e_hi) in enumerate(self.terms()):
            w = 1 if m == 0 else 2
            s_lo += w * e_lo
            s_hi += w * e_hi
            yield s_lo, s_hi, e_hi

    def tail_hi(self, n: int, e_hi_n: int) -> int:
        """Upper bound (fixed point) on Σ_{j>n} e_j given an upper bound on e_n; n ≥ 1."""
        p, q = self.param.numerator, self.param.denominator
        if self.family == "gaussian":
            return -((-(e_hi_n * p)) // (q * n))          # ceil(e_n σ²/n)
        r_hi = self._r[1]
        one = 1 << self.prec
        if r_hi >= one:
            raise ArithmeticError("Laplace ratio bound reached 1; raise the precision")
        return -((-(e_hi_n * r_hi)) // (one - r_hi))       # ceil(e_n r/(1-r))

    def z(self) -> tuple[int, int]:
        """(Z_lo, Z_hi): sums n terms until the tail bound is below n units in the last place
        (the rounding width of the partial sums is already of that order)."""
        if self._z is None:
            for n, (s_lo, s_hi, e_hi) in enumerate(self.partial_sums()):
                if n >= 1:
                    t = self.tail_hi(n, e_hi)
                    if 2 * t <= n + 1:
                        self._z = (s_lo, s_hi + 2 * t)
                        break
        assert self._z is not None  # the tail bound falls below n + 1 for some n (it decays)
        return self._z

    def s(self, m: int) -> tuple[int, int]:
        """(S_lo, S_hi) for one m, extending a cached list as needed."""
        while len(self._s_lo) <= m:
            s_lo, s_hi, _ = next(self._gen)
            self._s_lo.append(s_lo)
            self._s_hi.append(s_hi)
        return self._s_lo[m], self._s_hi[m]


def _table_entries_estimate(family: str, param: Fraction, bits: int = TABLE_BITS) -> int:
    """Float estimate of the table length (entries until C(m) ≥ 1 − 2^-bits)."""
    x = float(param)
    need = (bits + 2) * math.log(2)
    if family == "gaussian":
        return int(math.sqrt(2 * x * (need + 0.5 * math.log(max(x, 1.0)) + 2))) + 3
    return int(x * (need + math.log(max(x, 1.0)) + 2)) + 3


class TableSampler:
    """Exact sampler of a symmetric DG/DL by inversion of a 2^-b table of the magnitude CDF.

    ``bits`` (≤ 63) and ``max_entries`` exist so tests can force the rare exact-resolution path;
    production uses the defaults.
    """

    def __init__(self, family: str, param: Fraction, bits: int = TABLE_BITS,
                 max_entries: int | None = None) -> None:
        if not 1 <= bits <= 63:
            raise ValueError("bits must be in [1, 63]")
        self.family, self.param, self.bits = family, Fraction(param), bits
        cap = max_entries if max_entries is not None else MAX_TABLE_ENTRIES
        n_est = _table_entries_estimate(family, self.param, bits)
        prec = 64 + bits + max(n_est, 2).bit_length() + 8
        while True:
            table = self._build(prec, cap)
            if table is not None:
                break
            prec *= 2
            if prec > 1 << 16:  # would need C(m)·2^b to be (almost) an integer
                raise ArithmeticError(f"cannot determine the table of {family} {param} to 2^-{bits}")
        self.table = table
        self.n_entries = len(table)
        # Guide table over the top g bits of U: bucket i holds U in [i, i+1)·2^(b-g). The first
        # k with T_k ≥ U lies in [G[i], G[i+1]]; when G[i] == G[i+1] no boundary (and no tie)
        # falls in the bucket and k = G[i] is decided by the lookup alone (``_mag``); the other
        # buckets (``_ambig``: one byte each, cheaper to gather than a flag packed into an int64)
        # are searched exactly.
        g = min(GUIDE_BITS, bits)
        self._g = g
        starts = np.arange((1 << g) + 1, dtype=np.uint64) << np.uint64(bits - g)
        guide = np.searchsorted(table, starts, side="left").astype(np.int64)
        self._mag = guide[:-1]
        self._ambig = (guide[1:] != guide[:-1]) | (guide[:-1] >= table.size)  # or beyond a truncated table
        self._complete = bool(table.size) and int(table[-1]) == (1 << bits) - 1
        self._bounds: dict[int, CdfBounds] = {}
        self._lock = threading.Lock()  # the lazily extended bounds are shared between threads
        self.resolved_draws = 0  # how many draws needed the exact resolution path

    def _build(self, prec: int, cap: int) -> np.ndarray | None:
        """The table T_m = ⌊2^b C(m)⌋ up to the first m with T_m = 2^b − 1 (or ``cap`` entries);
        ``None`` if some floor is not determined at this precision."""
        b = CdfBounds(self.family, self.param, prec)
        z_lo, z_hi = b.z()
        top = (1 << self.bits) - 1
        out: list[int] = []
        for s_lo, s_hi, _ in b.partial_sums():
            t_lo = (s_lo << self.bits) // z_hi
            t_hi = (s_hi << self.bits) // z_lo
            if t_lo != t_hi:
                return None
            out.append(min(t_lo, top))  # C(m) < 1 so the floor is ≤ top; min() is a no-op guard
            if t_lo >= top or len(out) >= cap:
                break
        return np.array(out, dtype=np.uint64)

    def magnitudes(self, u: np.ndarray, source: RandomSource) -> np.ndarray:
        """Magnitudes for uniform b-bit integers ``u`` (uint64 < 2^b), int64 of the same shape."""
        return self._lookup((u >> np.uint64(self.bits - self._g)).view(np.int64), lambda i: u[i], source)

    def _lookup(self, bucket: np.ndarray, u_at: Callable[[np.ndarray], np.ndarray],
                source: RandomSource) -> np.ndarray:
        """Magnitudes (int64, the shape of ``bucket``) of b-bit integers U in guide buckets
        ``bucket`` (int64): the bucket's own where it decides, else an exact search of the table
        for ``u_at(positions)``, the U of those positions (rare draws resolved in position order)."""
        m = self._mag.take(bucket)
        amb = np.flatnonzero(self._ambig.take(bucket))
        if amb.size:
            ua = u_at(amb)
            ka = np.searchsorted(self.table, ua, side="left")
            rare = np.flatnonzero(ka >= self.n_entries) if not self._complete else np.empty(0, np.int64)
            inside = ka < self.n_entries
            tie = np.zeros(ka.size, dtype=bool)
            tie[inside] = self.table[ka[inside]] == ua[inside]
            rare = np.union1d(rare, np.flatnonzero(tie))
            if rare.size:
                with self._lock:
                    for i in rare.tolist():
                        ka[i] = self._resolve(int(ua[i]), int(ka[i]), source)
            m[amb] = ka
        return m

    def sample(self, size: int, source: RandomSource) -> np.ndarray:
        """``size`` exact draws as int64 from one 64-bit word each: the top b bits are U, the
        lowest bit the sign (b ≤ 63, so the two never overlap)."""
        w = source.uint64(size)
        top = w >> np.uint64(64 - self._g)
        bucket = top.view(np.int64)
        m = self._lookup(bucket, lambda i: w[i] >> np.uint64(64 - self.bits), source)
        neg = bucket                       # the buckets' array again, now for the signs
        np.bitwise_and(w, np.uint64(1), out=top)
        np.negative(neg, out=neg)          # 0 or -1 (all ones)
        m ^= neg                           # m or ~m
        m -= neg                           # m or ~m + 1 = -m
        return m

    def _cdf_bounds(self, prec: int) -> CdfBounds:
        if prec not in self._bounds:
            self._bounds[prec] = CdfBounds(self.family, self.param, prec)
        return self._bounds[prec]

    def _resolve(self, u: int, k: int, source: RandomSource) -> int:
        """Exact min{m : V < C(m)} for V ∈ [u, u+1)/2^b, given C(k−1) < V (step 3 above)."""
        self.resolved_draws += 1
        a, L, m = u, self.bits, k
        prec = L + 128
        while True:
            bnd = self._cdf_bounds(prec)
            z_lo, z_hi = bnd.z()
            s_lo, s_hi = bnd.s(m)
            if a * z_lo >= s_hi << L:          # V ≥ a/2^L ≥ C(m): not m
                m += 1
                continue
            if (a + 1) * z_hi <= s_lo << L:    # V < (a+1)/2^L ≤ C(m): m is the answer
                return m
            a = (a << 64) | int(source.uint64(1)[0])
            L += 64
            if prec < L + 64:
                prec = L + 128
