"""Review metrics against hand-computed values on small fixtures (deterministic, no sampling)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.model.spec import load_spec
from pipeline.review.comparators import noisy_clipped_statistics, wls_statistics
from pipeline.review.metrics import (
    MetricsError,
    error_table,
    largest_group_within,
    level_metrics,
    size_bin_index,
    sparsity,
    statistic_vectors,
)

TRUTH = np.array([0, 5, 20, 100, 600], dtype=float)
EST = np.array([1, 4, 23, 100, 590], dtype=float)


def test_error_metrics_hand_computed():
    t = error_table(TRUTH, EST, TRUTH, ["s"])
    assert t[("s", "n", "all")] == 5
    assert t[("s", "mae", "all")] == pytest.approx(3.0)
    assert t[("s", "rmse", "all")] == pytest.approx(math.sqrt(111 / 5))
    assert t[("s", "bias", "all")] == pytest.approx(-1.4)
    assert t[("s", "max_abs", "all")] == 10
    # |err| sorted = 0,1,1,3,10: the 95th percentile (linear) is 3 + 0.8 * 7
    assert t[("s", "p95_abs", "all")] == pytest.approx(8.6)
    # only the unit with 600 persons qualifies for MAPE: 10 / 600
    assert t[("s", "mape_500", "all")] == pytest.approx(100 * 10 / 600)


def test_bias_sign_and_size_bins():
    t = error_table(TRUTH, EST, TRUTH, ["s"])
    # each unit falls in its own bin; the sign follows estimate - truth
    assert t[("s", "bias", "0")] == 1 and t[("s", "bias", "1-9")] == -1
    assert t[("s", "bias", "10-49")] == 3 and t[("s", "bias", "50-249")] == 0
    assert t[("s", "bias", "250-999")] == -10
    assert ("s", "n", ">=1000") not in t  # empty bins are left out
    assert list(size_bin_index(np.array([0, 1, 9, 10, 49, 50, 249, 250, 999, 1000, 10**6]))) == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # MAPE is NaN where no unit has >= 500 persons
    assert math.isnan(error_table(TRUTH[:3], EST[:3], TRUTH[:3], ["s"])[("s", "mape_500", "all")])


def test_error_table_rejects_mismatched_shapes():
    with pytest.raises(MetricsError):
        error_table(TRUTH, EST[:4], TRUTH, ["s"])
    with pytest.raises(MetricsError):
        size_bin_index(np.array([-1]))


def test_largest_group_target():
    true_groups = np.array([[300, 200], [400, 200], [60, 40]])
    est_groups = np.array([[280, 220], [350, 250], [10, 90]])
    share, n = largest_group_within(true_groups, est_groups, true_groups.sum(1), est_groups.sum(1))
    # unit 0: 60% -> 56% (within 5 pp); unit 1: 66.7% -> 58.3% (8.3 pp off); unit 2 < 500 persons
    assert n == 2 and share == pytest.approx(0.5)
    share, n = largest_group_within(true_groups[2:], est_groups[2:], true_groups[2:].sum(1), est_groups[2:].sum(1))
    assert n == 0 and math.isnan(share)


def test_sparsity_shares():
    truth = np.array([[0, 2, 0], [1, 0, 0]])
    est = np.array([[1, 2, 0], [0, 0, 0]])
    s = sparsity(truth, est)
    assert s["false_nonzero_share"] == pytest.approx(1 / 4)
    assert s["false_zero_share"] == pytest.approx(1 / 2)
    s = sparsity(truth, est, structural_zero=np.array([False, False, True]))
    assert s["false_nonzero_share"] == pytest.approx(1 / 2)
    # a clipped noisy estimate of 0.4 rounds to 0: not a published non-zero
    assert sparsity(truth, np.array([[0.4, 2, 0], [1, 0, 0]]))["false_nonzero_share"] == 0


def test_statistic_vectors_match_table_lines():
    spec = load_spec("pl94")
    stats = statistic_vectors()
    x = np.zeros((1, spec.n_cells), dtype=np.int64)
    # 3 adults: Hispanic White; non-Hispanic Black; non-Hispanic White;Asian, in a college dorm
    for hhgq, va, hisp, race in [(0, 1, 1, 1), (0, 1, 0, 2), (5, 1, 0, 9)]:
        x[0, ((hhgq * 2 + va) * 2 + hisp) * 63 + race - 1] += 1
    v = stats.values(x)[0]
    want = {"total": 3, "voting_age": 3, "hispanic": 1, "white_alone": 1, "black_alone": 1,
            "two_or_more": 1, "gq_total": 1, "gq_college": 1, "gq_noninstitutional": 1,
            "P2_005": 0, "P2_006": 1, "P2_011": 1, "P4_011": 1, "P1_013": 1}
    for k, val in want.items():
        assert v[stats.index(k)] == val, k


def _meas(rows):
    return pl.DataFrame(rows, schema={"unit": pl.Int64, "query": pl.Utf8, "answer": pl.Int32,
                                      "value": pl.Int64, "variance": pl.Float64}, orient="row")


def test_noisy_clipped_uses_best_query_and_clips():
    spec = load_spec("pl94")
    stats = statistic_vectors(detail=False)
    # unit 0: total measured as -3, detailed cells 0 (White, NH adult hh) = 5 and 63 = -2
    rows = [(0, "total", 0, -3, 4.0), (0, "detailed", 63 * 2, 5, 9.0), (0, "detailed", 63 * 2 + 1, -2, 9.0)]
    out = noisy_clipped_statistics(_meas(rows), spec, stats, n_units=1)[0]
    assert out[stats.index("total")] == 0          # from the total query, clipped
    assert out[stats.index("white_alone")] == 5    # from detailed, the negative cell clipped
    assert out[stats.index("black_alone")] == 0


def test_wls_combines_total_and_detailed_by_inverse_variance():
    spec = load_spec("pl94")
    stats = statistic_vectors(detail=False)
    n = spec.n_cells
    vd, vt = 2.0, 50.0
    det = np.zeros(n)
    det[[0, 5, 700]] = [10, 3, -1]
    rows = [(0, "detailed", int(c), int(det[c]), vd) for c in range(n)] + [(0, "total", 0, 20, vt)]
    out = wls_statistics(_meas(rows), spec, stats, n_units=1)[0]
    # total: the sum of detailed cells (variance n*vd) and the total answer (variance vt)
    s = det.sum()
    want = (s / (n * vd) + 20 / vt) / (1 / (n * vd) + 1 / vt)
    assert out[stats.index("total")] == pytest.approx(want, rel=1e-9)
    # noise-free measurements give the truth back exactly
    rows = [(0, "detailed", int(c), int(det[c]), vd) for c in range(n)] + [(0, "total", 0, int(s), vt)]
    out = wls_statistics(_meas(rows), spec, stats, n_units=1)[0]
    assert out[stats.index("total")] == pytest.approx(s)
    assert out[stats.index("white_alone")] == pytest.approx(10)


def test_level_metrics_long_format():
    stats = statistic_vectors(detail=False)
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 30, size=(40, len(stats.names))).astype(float)
    truth[:, stats.index("total")] = truth.sum(axis=1)
    df = level_metrics("tract", stats, truth, {"published": truth + 1, "wls": truth.copy()})
    assert df.columns == ["level", "statistic", "metric", "size_bin", "estimator", "value"]
    pub = df.filter((pl.col("estimator") == "published") & (pl.col("metric") == "bias") & (pl.col("size_bin") == "all"))
    assert pub["value"].to_list() == pytest.approx([1.0] * pub.height)
    w = df.filter((pl.col("estimator") == "wls") & (pl.col("metric") == "max_abs"))
    assert w["value"].max() == 0


def test_p95_and_max_by_bin_match_numpy():
    from pipeline.review.metrics import SIZE_BINS, _order_stats

    rng = np.random.default_rng(1)
    t = rng.poisson(30, (2000, 12)).astype(float)
    t[:50] = 0
    a = np.abs(rng.normal(0, 3, t.shape) * rng.random(t.shape) * 50)
    bins = size_bin_index(t)
    o = _order_stats(np.ascontiguousarray(a.T), np.ascontiguousarray(bins.T))
    p = {k: v[0] for k, v in o.items()}
    assert o["all"][1] == pytest.approx(a.max(axis=0))
    for j in range(t.shape[1]):
        assert p["all"][j] == pytest.approx(np.percentile(a[:, j], 95))
        for i, (label, _, _) in enumerate(SIZE_BINS):
            m = bins[:, j] == i
            if m.any():
                assert p[label][j] == pytest.approx(np.percentile(a[m, j], 95)), (label, j)
            else:
                assert math.isnan(p[label][j])


def test_coverage_rows_count_intervals_that_hold_the_truth() -> None:
    from pipeline.review.metrics import POOLED, coverage_rows

    truth = np.array([[0.0, 10.0], [5.0, 300.0], [2.0, 40.0]])
    published = np.array([[1.0, 12.0], [5.0, 290.0], [0.0, 40.0]])
    moe = np.array([[1.0, 1.0], [0.0, 5.0], [1.0, np.nan]])  # NaN: no margin, left out
    rows = coverage_rows("tract", ["a", "b"], truth, published, moe)
    look = {(r["statistic"], r["metric"], r["size_bin"]): r["value"] for r in rows.iter_rows(named=True)}
    assert look[("a", "moe90_coverage", "all")] == pytest.approx(2 / 3)   # |1-0|<=1, |5-5|<=0, |0-2|>1
    assert look[("b", "moe90_coverage", "all")] == pytest.approx(0.0)     # 2 > 1, 10 > 5; the NaN is left out
    assert look[(POOLED, "moe90_coverage", "all")] == pytest.approx(2 / 5)
    assert look[(POOLED, "n", "all")] == 5
    assert look[("b", "moe90_coverage", "250-999")] == 0.0 and look[("a", "moe90_coverage", "0")] == 1.0
    assert look[("a", "moe90_median", "all")] == 1.0


def test_paired_differences_and_verdicts() -> None:
    import polars as pl

    from pipeline.review.paired import paired_differences, verdict

    rows = []
    for t in range(5):
        for setting, value in (("a", 10.0 + t), ("b", 8.0 + t + 0.01 * t)):
            rows.append({"setting": setting, "trial": t, "level": "tract", "statistic": "total", "metric": "rmse",
                         "size_bin": "all", "estimator": "published", "value": value})
    d = paired_differences(pl.DataFrame(rows), "a", "b").row(0, named=True)
    assert d["trials"] == 5 and d["diff"] == pytest.approx(-2.0 + 0.02)
    assert d["significant"] and verdict(d) == "better"
    same = pl.DataFrame([{**r, "value": r["value"] + (0.5 if r["trial"] % 2 else -0.5) * (r["setting"] == "b")}
                         for r in rows if True]).with_columns(
        pl.when(pl.col("setting") == "b").then(pl.col("value") + 2.0 - 0.01 * pl.col("trial")).otherwise(
            pl.col("value")).alias("value"))
    d2 = paired_differences(same, "a", "b").row(0, named=True)
    assert verdict(d2) == "same"
