"""Accuracy metrics of published counts against the truth (pure functions over numpy arrays).

Everything here is a function of two arrays per geographic level: the *true* value of a
statistic for each unit and an *estimate* of it (published, raw noisy clipped, or WLS), both
``(n_units,)`` or, for many statistics at once, ``(n_units, n_stats)``. Counts are persons
(or housing units for the units statistics); errors are ``estimate - truth`` in the same unit.

Statistics are 0/1 vectors over the 2,016 cells of the persons histogram
(:func:`statistic_vectors`): the headline totals (total population, voting age, Hispanic,
each major race alone, two or more races, group quarters by type) and every line of the
P.L. 94-171 tables P1–P4, so a statistic's value for every unit is one sparse product
``X @ V``.

Size bins: a unit's error for a statistic is binned by the statistic's *true* value in that
unit (0, 1–9, 10–49, 50–249, 250–999, ≥1000), which is what shows post-processing bias
(small counts pushed up, large ones down). MAPE uses the units whose true total population
is at least 500 and whose true value of the statistic is positive.

Every value these functions return is derived from confidential truth: see
``pipeline.review`` for where they may be written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from pipeline.errors import DptabError
from pipeline.release.tables import histogram_matrix, load_tables

#: True-size bins ``(label, low, high)`` with inclusive bounds (``high`` None = no upper bound).
SIZE_BINS: tuple[tuple[str, int, int | None], ...] = (
    ("0", 0, 0), ("1-9", 1, 9), ("10-49", 10, 49), ("50-249", 50, 249),
    ("250-999", 250, 999), (">=1000", 1000, None),
)
ALL_BIN = "all"
MAPE_MIN_POP = 500
#: Metrics computed per (statistic, size bin); ``n`` is the number of units in the bin.
ERROR_METRICS = ("n", "mae", "rmse", "bias", "p95_abs", "max_abs", "mape_500")
METRICS_SCHEMA = {"level": pl.Utf8, "statistic": pl.Utf8, "metric": pl.Utf8,
                  "size_bin": pl.Utf8, "estimator": pl.Utf8, "value": pl.Float64}

#: Headline statistics as (name, table, line) of ``schemas/tables/pl94.yaml``.
HEADLINE: tuple[tuple[str, str, int], ...] = (
    ("total", "P1", 1), ("voting_age", "P3", 1), ("hispanic", "P2", 2),
    ("white_alone", "P1", 3), ("black_alone", "P1", 4), ("aian_alone", "P1", 5),
    ("asian_alone", "P1", 6), ("nhpi_alone", "P1", 7), ("sor_alone", "P1", 8),
    ("two_or_more", "P1", 9),
    ("gq_total", "P5", 1), ("gq_institutional", "P5", 2), ("gq_correctional", "P5", 3),
    ("gq_juvenile", "P5", 4), ("gq_nursing", "P5", 5), ("gq_other_inst", "P5", 6),
    ("gq_noninstitutional", "P5", 7), ("gq_college", "P5", 8), ("gq_military", "P5", 9),
    ("gq_other_noninst", "P5", 10),
)
#: The race/ethnic groups of the redistricting target: Hispanic, and the non-Hispanic
#: single races and two-or-more (P2 lines 2, 5–11); P2 line 1 is the total.
ETHNIC_GROUP_LINES = (2, 5, 6, 7, 8, 9, 10, 11)
DETAIL_TABLES = ("P1", "P2", "P3", "P4")


class MetricsError(DptabError, ValueError):
    """Arrays given to a metric do not fit together (shapes, units, cells)."""


@dataclass(frozen=True)
class Statistics:
    """Named statistics as columns of a sparse 0/1 matrix ``vectors`` ``(n_cells, n_stats)``."""

    names: tuple[str, ...]
    vectors: sp.csc_matrix

    def index(self, name: str) -> int:
        return self.names.index(name)

    def values(self, hist) -> np.ndarray:
        """Statistic values per unit, float64 ``(n_units, n_stats)``, of a SparseHistogram,
        a dense ``(n_units, n_cells)`` array or a CSR matrix."""
        x = hist if sp.issparse(hist) else histogram_matrix(hist)
        if x.shape[1] != self.vectors.shape[0]:
            raise MetricsError(f"histogram has {x.shape[1]} cells, statistics need {self.vectors.shape[0]}")
        return np.asarray((x.astype(np.float64) @ self.vectors).toarray(), dtype=np.float64)


def is_pl94_tables(ts) -> bool:
    """Do the table shells hold every table the PL94 headline statistics and target read?"""
    return all(t in ts.tables for t in {h[1] for h in HEADLINE} | set(DETAIL_TABLES))


def statistic_vectors(tables: str = "pl94", detail: bool = True) -> Statistics:
    """The persons statistics: headline names, then ``P1_001`` … ``P4_073`` when ``detail``.

    Table shells other than PL94's give ``total`` (their persons total line) and every line of
    every persons table, named ``<table>_<line:03d>``."""
    ts = load_tables(tables)
    if not is_pl94_tables(ts):
        return _generic_statistics(ts)
    names: list[str] = []
    cols: list[np.ndarray] = []
    for name, table, line in HEADLINE:
        t = ts.tables[table]
        names.append(name)
        cols.append(t.matrix[t.index(line)].toarray().ravel())
    if detail:
        for table in DETAIL_TABLES:
            t = ts.tables[table]
            dense = t.matrix.toarray()
            for i, line in enumerate(t.numbers):
                names.append(f"{table}_{line:03d}")
                cols.append(dense[i])
    p2 = ts.tables["P2"]
    for line in (1, *ETHNIC_GROUP_LINES):  # the redistricting target needs these lines
        if f"P2_{line:03d}" not in names:
            names.append(f"P2_{line:03d}")
            cols.append(p2.matrix[p2.index(line)].toarray().ravel())
    v = sp.csc_matrix(np.stack(cols, axis=1).astype(np.float64))
    return Statistics(tuple(names), v)


def _generic_statistics(ts) -> Statistics:
    names: list[str] = []
    cols: list[np.ndarray] = []
    total = ts.total_line("persons")
    if total is None:
        raise MetricsError(f"tables {ts.name!r}: no persons table has a line counting every cell (the total)")
    t = ts.tables[total[0]]
    names.append("total")
    cols.append(t.matrix[t.index(total[1])].toarray().ravel())
    for t in ts.of_kind("persons"):
        dense = t.matrix.toarray()
        for i, line in enumerate(t.numbers):
            names.append(f"{t.name}_{line:03d}")
            cols.append(dense[i])
    return Statistics(tuple(names), sp.csc_matrix(np.stack(cols, axis=1).astype(np.float64)))


def size_bin_index(true_values: np.ndarray) -> np.ndarray:
    """Index into :data:`SIZE_BINS` of each true value (int64, same shape; values < 0 refused)."""
    t = np.asarray(true_values)
    if np.any(t < 0):
        raise MetricsError("true counts must be >= 0")
    edges = np.array([b[1] for b in SIZE_BINS[1:]], dtype=np.float64)  # 1, 10, 50, 250, 1000
    return np.searchsorted(edges, t, side="right").astype(np.int64)


def _percentile_sorted(a_sorted: np.ndarray, start: np.ndarray, count: np.ndarray, q: float) -> np.ndarray:
    """Linear-interpolation percentile ``q`` of each row's segment ``[start, start+count)`` of
    the row-sorted array ``a_sorted`` ``(s, n)`` (``numpy.percentile``'s default rule); NaN if empty."""
    last = start + np.maximum(count - 1, 0)
    pos = start + (q / 100.0) * np.maximum(count - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, last)
    rows = np.arange(a_sorted.shape[0])
    n = a_sorted.shape[1]
    vlo = a_sorted[rows, np.clip(lo, 0, n - 1)]
    vhi = a_sorted[rows, np.clip(hi, 0, n - 1)]
    return np.where(count > 0, vlo + (pos - lo) * (vhi - vlo), np.nan)


def _order_stats(a: np.ndarray, bins: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(p95, max)`` of ``a`` ``(s, n)`` per row (statistic), overall and within each size bin.

    Two row-wise sorts instead of a masked percentile per bin: sorting by (bin, value) makes
    every bin a contiguous, sorted segment of each row."""
    s, n = a.shape
    zero = np.zeros(s, dtype=np.int64)
    srt = np.sort(a, axis=1)
    full = np.full(s, n)
    out = {ALL_BIN: (_percentile_sorted(srt, zero, full, 95), _percentile_sorted(srt, zero, full, 100))}
    # bins are small integers and a >= 0, so bin * (max + 1) + a orders by (bin, a)
    scale = a.max(initial=0) + 1.0
    srt = np.sort(bins * scale + a, axis=1)
    srt -= np.sort(bins, axis=1) * scale
    start = zero.copy()
    for i, b in enumerate(SIZE_BINS):
        count = (bins == i).sum(axis=1)
        out[b[0]] = (_percentile_sorted(srt, start, count, 95), _percentile_sorted(srt, start, count, 100))
        start = start + count
    return out


def _binned_metrics(err: np.ndarray, truth: np.ndarray, bins: np.ndarray, pop_ok: np.ndarray
                    ) -> dict[str, dict[str, np.ndarray]]:
    """``{size_bin: {metric: (s,)}}`` for ``err``/``truth`` ``(s, n)`` (statistic-major);
    ``pop_ok`` ``(1, n)`` marks units with >= 500 persons. Sums by bin are one ``bincount`` each."""
    s, n = err.shape
    nb = len(SIZE_BINS)
    key = (np.arange(s, dtype=np.int64)[:, None] * nb + bins).ravel()

    def by_bin(w: np.ndarray | None) -> np.ndarray:
        return np.bincount(key, weights=None if w is None else w.ravel(), minlength=s * nb).reshape(s, nb)

    a = np.abs(err)
    ok = pop_ok & (truth > 0)
    sums = {"n": by_bin(None), "e": by_bin(err), "a": by_bin(a), "e2": by_bin(err * err),
            "k": by_bin(ok.astype(np.float64)),
            "ape": by_bin(np.where(ok, a / np.where(truth > 0, truth, 1.0), 0.0))}
    order = _order_stats(a, bins)
    out: dict[str, dict[str, np.ndarray]] = {}
    for label, j in [(ALL_BIN, None)] + [(b[0], i) for i, b in enumerate(SIZE_BINS)]:
        v = {k: (x.sum(axis=1) if j is None else x[:, j]) for k, x in sums.items()}
        cnt = v["n"]
        safe = np.where(cnt > 0, cnt, 1.0)
        empty = cnt == 0
        out[label] = {
            "n": cnt.astype(np.float64),
            "mae": np.where(empty, np.nan, v["a"] / safe),
            "rmse": np.where(empty, np.nan, np.sqrt(v["e2"] / safe)),
            "bias": np.where(empty, np.nan, v["e"] / safe),
            "p95_abs": order[label][0],
            "max_abs": order[label][1],
            "mape_500": np.where(v["k"] > 0, 100.0 * v["ape"] / np.where(v["k"] > 0, v["k"], 1.0), np.nan),
        }
    return out


def error_table(truth: np.ndarray, estimate: np.ndarray, true_pop: np.ndarray,
                names: tuple[str, ...] | list[str]) -> dict[tuple[str, str, str], float]:
    """Every error metric for every statistic and size bin.

    ``truth``, ``estimate``: ``(n_units, n_stats)`` (or ``(n_units,)`` for one statistic);
    ``true_pop``: ``(n_units,)`` true total population (for MAPE's ≥ 500 rule).
    Returns ``{(statistic, metric, size_bin): value}`` with metrics :data:`ERROR_METRICS`
    (``n`` = units; ``mape_500`` in percent, NaN when no unit qualifies); empty bins are left
    out, the ``all`` bin is always present.
    """
    t = np.asarray(truth, dtype=np.float64)
    e = np.asarray(estimate, dtype=np.float64)
    if t.ndim == 1:
        t, e = t[:, None], e[:, None]
    if t.shape != e.shape or t.shape[1] != len(names) or len(true_pop) != t.shape[0]:
        raise MetricsError(f"truth {t.shape}, estimate {e.shape}, {len(names)} names and "
                           f"{len(true_pop)} populations do not fit")
    # work statistic-major (s, n): every reduction and sort runs over contiguous memory
    t = np.ascontiguousarray(t.T)
    err = np.ascontiguousarray(e.T) - t
    pop_ok = (np.asarray(true_pop) >= MAPE_MIN_POP)[None, :]
    bins = size_bin_index(t)
    res = _binned_metrics(err, t, bins, pop_ok)
    out: dict[tuple[str, str, str], float] = {}
    for label, r in res.items():
        for j, name in enumerate(names):
            if label != ALL_BIN and r["n"][j] == 0:
                continue
            for m in ERROR_METRICS:
                out[(name, m, label)] = float(r[m][j])
    return out


def largest_group_within(true_groups: np.ndarray, est_groups: np.ndarray, true_total: np.ndarray,
                         est_total: np.ndarray, min_pop: int = MAPE_MIN_POP, tolerance_pp: float = 5.0
                         ) -> tuple[float, int]:
    """The Census redistricting target for one level and estimator.

    ``true_groups``, ``est_groups``: ``(n_units, n_groups)`` counts of the race/ethnic groups
    (:data:`ETHNIC_GROUP_LINES`); ``true_total``, ``est_total``: ``(n_units,)``. Among units
    with true total ≥ ``min_pop``, the share (0–1) whose *truly* largest group's estimated share
    of the estimated total is within ``tolerance_pp`` percentage points of its true share.
    Returns ``(share, n_units_considered)``; share is NaN when no unit qualifies.
    """
    tg = np.asarray(true_groups, dtype=np.float64)
    eg = np.asarray(est_groups, dtype=np.float64)
    tt = np.asarray(true_total, dtype=np.float64)
    et = np.asarray(est_total, dtype=np.float64)
    keep = tt >= min_pop
    n = int(keep.sum())
    if n == 0:
        return float("nan"), 0
    tg, eg, tt, et = tg[keep], eg[keep], tt[keep], et[keep]
    g = np.argmax(tg, axis=1)
    rows = np.arange(n)
    true_share = tg[rows, g] / tt
    est_share = np.where(et > 0, eg[rows, g] / np.where(et > 0, et, 1.0), 0.0)
    ok = np.abs(est_share - true_share) * 100.0 <= tolerance_pp + 1e-12
    return float(ok.mean()), n


def _as_csr(hist) -> sp.csr_matrix:
    """A float64 CSR copy of a SparseHistogram, a dense array or a sparse matrix."""
    if sp.issparse(hist):
        return sp.csr_matrix(hist, dtype=np.float64, copy=True)
    if isinstance(hist, np.ndarray):
        return sp.csr_matrix(hist.astype(np.float64))
    return histogram_matrix(hist).astype(np.float64)


def _keys(x: sp.csr_matrix, n_cells: int) -> np.ndarray:
    """Sorted flat keys ``unit * n_cells + cell`` of the non-zero cells of a CSR matrix."""
    x = x.copy()
    x.eliminate_zeros()
    coo = x.tocoo()
    return np.sort(coo.row.astype(np.int64) * n_cells + coo.col.astype(np.int64))


def sparsity(truth, estimate, structural_zero: np.ndarray | None = None) -> dict[str, float]:
    """Sparsity errors over all ``n_units × n_cells`` detailed cells of a level.

    ``truth``/``estimate``: SparseHistogram, dense ``(n_units, n_cells)`` array or CSR matrix
    (non-negative counts; an estimate cell counts as non-zero when it is ≥ 0.5 after rounding,
    so clipped noisy answers can be compared). ``structural_zero`` (bool ``(n_cells,)``) cells
    are left out of the true-zero denominator. Returns ``false_nonzero_share`` (true-zero cells
    published non-zero / true-zero cells) and ``false_zero_share`` (true non-zero cells
    published zero / true non-zero cells), each in 0–1 (NaN with an empty denominator).
    """
    xt = _as_csr(truth)
    xe = _as_csr(estimate)
    xe.data = np.rint(xe.data)
    if xt.shape != xe.shape:
        raise MetricsError(f"truth {xt.shape} and estimate {xe.shape} differ in shape")
    n_units, n_cells = xt.shape
    kt, ke = _keys(xt, n_cells), _keys(xe, n_cells)
    both = np.intersect1d(kt, ke, assume_unique=True).size
    eligible = n_units * n_cells
    if structural_zero is not None:
        eligible -= n_units * int(np.asarray(structural_zero, dtype=bool).sum())
    true_zero = eligible - kt.size
    return {
        "false_nonzero_share": (ke.size - both) / true_zero if true_zero > 0 else float("nan"),
        "false_zero_share": (kt.size - both) / kt.size if kt.size > 0 else float("nan"),
    }


def level_metrics(level: str, stats: Statistics, truth_values: np.ndarray,
                  estimates: dict[str, np.ndarray]) -> pl.DataFrame:
    """Long-format metrics of one level for several estimators.

    ``truth_values``: ``(n_units, n_stats)`` true statistic values (``stats.values(truth)``);
    ``estimates[estimator]``: the same shape. Rows: every error metric by size bin, plus
    ``largest_group_within_5pp`` and ``units_500plus`` (statistic ``largest_group``, bin
    ``all``). Columns :data:`METRICS_SCHEMA`.
    """
    true_pop = truth_values[:, stats.index("total")]
    target = "P2_001" in stats.names  # the redistricting target reads the PL94 P2 lines
    group_idx = [stats.index(f"P2_{ln:03d}") for ln in ETHNIC_GROUP_LINES] if target else []
    tot_idx = stats.index("P2_001") if target else 0
    rows: list[tuple] = []
    for est_name, est in estimates.items():
        for (s, m, b), v in error_table(truth_values, est, true_pop, stats.names).items():
            rows.append((level, s, m, b, est_name, v))
        if not target:
            continue
        share, n = largest_group_within(truth_values[:, group_idx], est[:, group_idx],
                                        truth_values[:, tot_idx], est[:, tot_idx])
        rows.append((level, "largest_group", "within_5pp_share", ALL_BIN, est_name, share))
        rows.append((level, "largest_group", "n", ALL_BIN, est_name, float(n)))
    return pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")


def sparsity_rows(level: str, estimator: str, result: dict[str, float]) -> pl.DataFrame:
    """Rows of :func:`sparsity` in the long metrics format (statistic ``detailed``, bin ``all``)."""
    return pl.DataFrame([(level, "detailed", k, ALL_BIN, estimator, float(v)) for k, v in result.items()],
                        schema=METRICS_SCHEMA, orient="row")


#: The statistic name of coverage pooled over every table-line statistic of a level.
POOLED = "all_lines"


def coverage_rows(level: str, names: tuple[str, ...] | list[str], truth: np.ndarray, published: np.ndarray,
                  moe90: np.ndarray, estimator: str = "published") -> pl.DataFrame:
    """How often the published interval ``count ± moe90`` holds the truth, and how wide it is.

    ``truth``, ``published``: ``(n_units, n_stats)``; ``moe90``: the same shape (per unit) or
    ``(n_stats,)`` (one margin per line), NaN where a line has none (left out). Rows (columns
    :data:`METRICS_SCHEMA`): per statistic and size bin ``moe90_coverage`` (share of units
    covered, 0–1) and ``moe90_median`` (median margin, counts); and the same pooled over every
    statistic as :data:`POOLED` (the coverage a user meets across a whole level's tables).
    """
    t = np.asarray(truth, np.float64)
    p = np.asarray(published, np.float64)
    m = np.broadcast_to(np.asarray(moe90, np.float64), t.shape)
    if t.shape != p.shape or t.shape[1] != len(names):
        raise MetricsError(f"truth {t.shape}, published {p.shape} and {len(names)} names do not fit")
    ok = ~np.isnan(m)
    covered = (np.abs(p - t) <= m + 1e-9) & ok  # margins are rounded to 2 decimals on release
    bins = size_bin_index(t)
    rows = []
    for label, sel in [(ALL_BIN, ok)] + [(b[0], ok & (bins == i)) for i, b in enumerate(SIZE_BINS)]:
        n = sel.sum(axis=0)
        for j, name in enumerate(names):
            if n[j]:
                rows.append((level, name, "moe90_coverage", label, estimator, float(covered[:, j][sel[:, j]].mean())))
                rows.append((level, name, "moe90_median", label, estimator, float(np.median(m[:, j][sel[:, j]]))))
        if sel.any():
            rows.append((level, POOLED, "moe90_coverage", label, estimator, float(covered[sel].mean())))
            rows.append((level, POOLED, "moe90_median", label, estimator, float(np.median(m[sel]))))
            rows.append((level, POOLED, "n", label, estimator, float(sel.sum())))
    return pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")
