"""Experiment settings, the mean ± sd summary and the accuracy-vs-ε report section."""

from __future__ import annotations

import math
from fractions import Fraction

import polars as pl
import pytest

from pipeline.privacy.accounting import load_strategy
from pipeline.review.experiment import ExperimentError, make_settings, summarise
from pipeline.review.report import write_experiment_report


def test_rho_settings_rescale_the_strategy_exactly(tmp_path):
    settings = make_settings("census2020_pl94", 1e-10, ["1", "293764/114921", "10"], None, tmp_path)
    assert [s.rho for s in settings] == ["1", "293764/114921", "10"]
    eps = [s.epsilon for s in settings]
    assert eps == sorted(eps) and eps[1] == pytest.approx(17.1436, abs=1e-3)  # the certified 2020 ε
    base = load_strategy("census2020_pl94")
    scaled = load_strategy(settings[0].strategy)
    # same shares: every (level, query) ρ scales by the same exact factor
    factor = Fraction(1) / base.rho
    for key, r in base.rho_by_level_query().items():
        assert scaled.rho_by_level_query()[key] == r * factor


def test_settings_reject_bad_options(tmp_path):
    with pytest.raises(ExperimentError, match="not both"):
        make_settings("uniform", 1e-10, ["1"], ["uniform"], tmp_path)
    with pytest.raises(ExperimentError, match="must be > 0"):
        make_settings("uniform", 1e-10, ["-1"], None, tmp_path)
    with pytest.raises(ExperimentError, match="not a number"):
        make_settings("uniform", 1e-10, ["abc"], None, tmp_path)
    s = make_settings("uniform", 1e-10, None, ["uniform", "census2020_pl94"], tmp_path)
    assert [x.name for x in s] == ["uniform", "census2020_pl94"] and s[0].rho == "1"


def _trials() -> pl.DataFrame:
    rows = []
    for setting, eps, vals in (("rho=1", 5.0, [4.0, 6.0, 5.0]), ("rho=10", 20.0, [1.0, 1.0, 1.3])):
        for t, v in enumerate(vals):
            for lv in ("county", "tract"):
                rows.append((lv, "total", "mae", "all", "published", v * (2 if lv == "tract" else 1),
                             setting, setting[4:], eps, t))
    rows.append(("tract", "total", "mape_500", "all", "published", float("nan"), "rho=1", "1", 5.0, 0))
    return pl.DataFrame(rows, orient="row", schema=["level", "statistic", "metric", "size_bin", "estimator",
                                                    "value", "setting", "rho", "epsilon", "trial"])


def test_summary_mean_and_sd():
    s = summarise(_trials())
    row = s.filter((pl.col("setting") == "rho=1") & (pl.col("level") == "county")).row(0, named=True)
    assert row["mean"] == pytest.approx(5.0) and row["sd"] == pytest.approx(1.0) and row["trials"] == 3
    row = s.filter((pl.col("setting") == "rho=10") & (pl.col("level") == "tract")).row(0, named=True)
    assert row["mean"] == pytest.approx(2 * 3.3 / 3)
    assert s.filter(pl.col("metric") == "mape_500").height == 0  # NaN trials are not averaged in
    one = summarise(_trials().filter(pl.col("trial") == 0))
    assert all(math.isnan(v) for v in one["sd"].to_list())      # one trial: no sd


def test_experiment_report_has_table_and_plot(tmp_path):
    out = tmp_path / "report.html"
    write_experiment_report(out, summarise(_trials()), {"dataset": "x", "trials per setting": 3}, confidential=True)
    text = out.read_text()
    assert "Accuracy vs ε" in text and text.count("data:image/png;base64,") == 1
    assert "5 ± 1" in text and "CONFIDENTIAL" in text
