"""Experiment settings, the mean ± sd summary and the accuracy-vs-ε report section."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import polars as pl
import pytest

from pipeline.model.strategy import load_strategy
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


def _tiny_inputs(tmp_path):
    """~1,500 persons in 12 blocks of 2 counties, with the housing units and dorms they need."""
    import numpy as np

    rng = np.random.default_rng(5)
    blocks = [f"44{c:03d}{t:06d}{b:04d}" for c in (1, 3) for t in (100, 200) for b in (1001, 1002, 2001)]
    rows, units = [], []
    for g in blocks:
        n = int(rng.integers(20, 250))
        gq = rng.random(n) < 0.05
        for i in range(n):
            rows.append((g, 5 if gq[i] else 0, int(rng.random() < .75), int(rng.random() < .2),
                         int(rng.choice([1, 2, 4, 6, 7]))))
        hh = int((~gq).sum())
        for k in range(max(1, hh // 3)):
            units.append((f"{g}-{k}", g, 0, True))
        units.append((f"{g}-v", g, 0, False))
        if gq.any():
            units.append((f"{g}-dorm", g, 5, None))
    persons = pl.DataFrame(rows, orient="row", schema=["geoid", "hhgq", "voting_age", "hispanic", "cenrace"])
    unitdf = pl.DataFrame(units, orient="row", schema={"unit_id": pl.Utf8, "geoid": pl.Utf8, "kind": pl.Int64,
                                                       "occupied": pl.Boolean})
    persons.write_parquet(tmp_path / "persons.parquet")
    unitdf.write_parquet(tmp_path / "units.parquet")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset_id: tiny\nconfidential: true\ninputs: {persons: persons.parquet, units: units.parquet}\n"
                   "privacy: {strategy: uniform, units_strategy: null, lifetime_rho: '5', ledger: runs/ledger.sqlite,"
                   " randomness: seeded, seed: 3}\noutput: {runs_dir: runs, releases_dir: releases}\n"
                   # the 2020 estimator: these tests are about the experiment, not the estimator
                   # (the --compare-estimators test sets each setting's estimator itself)
                   "postprocess: {estimator: topdown}\n")
    return cfg


def test_experiment_end_to_end(tmp_path):
    from pipeline.review.experiment import run_experiment

    cfg = _tiny_inputs(tmp_path)
    exp = run_experiment(cfg, trials=2, rhos=["1/4", "16"], workers=2, out_dir=tmp_path / "exp")
    trials = pl.read_parquet(exp / "trials.parquet")
    assert set(trials["trial"]) == {0, 1} and set(trials["setting"]) == {"rho=1/4", "rho=16"}
    s = pl.read_parquet(exp / "summary.parquet")
    mae = {r["setting"]: r["mean"] for r in s.filter(
        (pl.col("level") == "block") & (pl.col("statistic") == "P1_001") & (pl.col("metric") == "mae")
        & (pl.col("size_bin") == "all") & (pl.col("estimator") == "wls")).iter_rows(named=True)}
    # 64x the budget: the WLS block-total error shrinks ~8x in sd; a reversal would need a
    # > 5-sigma fluctuation over 24 block-trials (false-failure rate well below 1e-6)
    assert mae["rho=16"] < mae["rho=1/4"]
    assert (exp / "report.html").is_file() and "Accuracy vs ε" in (exp / "report.html").read_text()
    # nothing published, and no trial run directory is left behind
    assert not (exp / "never-published").exists()
    assert sorted(p.name for p in (exp / "runs").iterdir()) == ["base"]
    # the dataset's own ledger was never touched
    assert not (tmp_path / "runs" / "ledger.sqlite").exists()
    with pytest.raises(ExperimentError, match="already exists"):
        run_experiment(cfg, trials=1, out_dir=exp)


def test_compare_joint_is_paired_and_measures_units(tmp_path):
    """`--compare-joint`: the same seeds with persons and units independent and joint; the units
    run is measured in both (occupied units), and the joint trials' persons differ."""
    from pipeline.review.experiment import run_experiment

    cfg = _tiny_inputs(tmp_path)
    with pytest.raises(ExperimentError, match="units_strategy"):
        run_experiment(cfg, trials=1, out_dir=tmp_path / "exp0", compare_joint=True)
    cfg.write_text(cfg.read_text().replace("units_strategy: null", "units_strategy: census2020_units"))
    exp = run_experiment(cfg, trials=1, workers=2, out_dir=tmp_path / "exp", compare_joint=True)
    trials = pl.read_parquet(exp / "trials.parquet")
    assert set(trials["setting"]) == {"independent (2020)", "joint households"}
    occ = trials.filter(pl.col("statistic") == "occupied_units")
    assert occ.height and set(occ["setting"]) == {"independent (2020)", "joint households"}
    # paired: the units run draws the same noise in both settings, and is solved before the
    # persons either way, so its published errors are identical
    a, b = (occ.filter(pl.col("setting") == s).sort(["level", "metric", "size_bin"])["value"]
            for s in ("independent (2020)", "joint households"))
    import numpy as np

    assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
    with pytest.raises(ExperimentError, match="no --rho"):
        run_experiment(cfg, trials=1, rhos=["1"], out_dir=tmp_path / "exp2", compare_joint=True)


def test_review_of_a_real_run_stays_out_of_the_release(tmp_path):
    """The whole job on tiny inputs, then the review: no review file or truth-based metric name
    appears in the release folder, and a confidential review refuses to be exported there."""
    from pipeline.job.stages import run
    from pipeline.review.runner import ConfidentialityError, export_review, review_run_dir

    cfg = _tiny_inputs(tmp_path)
    out = run(cfg, progress=False)
    run_dir = Path(out["run_dir"])
    report = review_run_dir(run_dir)
    assert report.is_file() and (run_dir / "review" / "metrics.parquet").is_file()
    releases = [p for p in (tmp_path / "releases").iterdir() if p.is_dir()]
    assert len(releases) == 1
    files = [p for p in releases[0].rglob("*") if p.is_file()]
    assert files and not any(p.name in ("metrics.parquet", "report.html", "summary.md") for p in files)
    for p in files:
        if p.suffix in (".html", ".json", ".csv", ".md"):
            text = p.read_text(errors="ignore")
            assert "within_5pp" not in text and "mape_500" not in text and "internal review" not in text, p
    with pytest.raises(ConfidentialityError):
        export_review(run_dir, releases[0] / "review")
    assert not (releases[0] / "review").exists()


def test_experiment_markdown_orders_settings_by_epsilon():
    from pipeline.review.markdown import experiment_markdown

    text = experiment_markdown(summarise(_trials()))
    header = next(ln for ln in text.splitlines() if ln.startswith("| margin | level |"))
    assert header.index("ε 5.00") < header.index("ε 20.00")
    row = next(ln for ln in text.splitlines() if ln.startswith("| Total population | county |"))
    assert "5.00 ± 1.00" in row and "1.10 ± 0.17" in row


def test_compare_estimators_pairs_the_same_noise_and_reports_both(tmp_path):
    """`--compare-estimators`: topdown and full on the same seeds (both draw every answer, so the
    very same measurements); paired.parquet holds trial-by-trial differences that match the
    trials, and the report and summary carry the side-by-side and coverage sections."""
    from pipeline.review.experiment import run_experiment

    cfg = _tiny_inputs(tmp_path)
    with pytest.raises(ExperimentError, match="no --rho"):
        run_experiment(cfg, trials=1, rhos=["1"], out_dir=tmp_path / "exp0", compare_estimators=True)
    exp = run_experiment(cfg, trials=2, workers=2, out_dir=tmp_path / "exp", compare_estimators=True)
    trials = pl.read_parquet(exp / "trials.parquet")
    a, b = "topdown (2020)", "full (GLS)"
    assert set(trials["setting"]) == {a, b}
    paired = pl.read_parquet(exp / "paired.parquet")
    keys = {"level": "county", "statistic": "total", "metric": "rmse", "estimator": "published"}
    row = paired.filter(*[pl.col(k) == v for k, v in keys.items()] + [pl.col("size_bin") == "all"])
    assert row.height == 1 and row["trials"][0] == 2
    t = trials.filter(*[pl.col(k) == v for k, v in keys.items()] + [pl.col("size_bin") == "all"])
    per_trial = {s: t.filter(pl.col("setting") == s).sort("trial")["value"].to_numpy() for s in (a, b)}
    assert row["diff"][0] == pytest.approx(float((per_trial[b] - per_trial[a]).mean()), rel=1e-12, abs=1e-12)
    # the invariant state total is exact under both estimators
    st = trials.filter((pl.col("level") == "state") & (pl.col("statistic") == "total") & (pl.col("metric") == "mae")
                       & (pl.col("size_bin") == "all") & (pl.col("estimator") == "published"))
    assert st.height == 4 and (st["value"] == 0).all()
    html = (exp / "report.html").read_text()
    assert f"{b} vs {a} (paired trials)" in html
    md = (exp / "summary.md").read_text()
    assert "paired over 2 trials" in md and "Coverage of the published count" in md
    assert (exp / "coverage.parquet").is_file() and (exp / "bias.yaml").is_file()
