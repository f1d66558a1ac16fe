"""Review figures a reader can trust: zero bars are marked on log axes, labels never overlap,
and results below the 2020 redistricting target are highlighted (figure and report); the
report page escapes configured values."""

from __future__ import annotations

import itertools
import re

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import pytest
import yaml
from test_review_report import make_run

from pipeline.review import figures
from pipeline.review.metrics import ALL_BIN
from pipeline.review.report import TARGET_WITHIN_5PP, target_context
from pipeline.review.runner import review_run_dir

LEVELS = ["nation", "state", "county", "tract", "block_group", "block"]
NAN = float("nan")
# nation and state totals are invariants (published error 0); errors span decades (log axis);
# RI 2010 blocks: 86.1% within 5 pp against the 95% target
MAE = {"published": [0, 0, 41.0, 9.5, 6.1, 1.2], "noisy_clipped": [3.1, 3.4, 44.0, 12.0, 9.0, 1.9],
       "wls": [2.9, 3.0, 40.0, 10.0, 8.0, 2.5]}
SHARE = {"published": [NAN, 1.0, 0.99, 0.97, 0.93, 0.861], "noisy_clipped": [NAN, 1.0, 0.98, 0.9, 0.8, 0.5],
         "wls": [NAN, 1.0, 0.99, 0.96, 0.9, 0.7]}


def metrics() -> pl.DataFrame:
    rows = []
    for e in MAE:
        for i, lv in enumerate(LEVELS):
            rows += [(lv, "total", "mae", ALL_BIN, e, float(MAE[e][i])),
                     (lv, "total", "rmse", ALL_BIN, e, 1.3 * MAE[e][i]),
                     (lv, "largest_group", "within_5pp_share", ALL_BIN, e, SHARE[e][i]),
                     (lv, "largest_group", "n", ALL_BIN, e, 0.0 if lv == "nation" else 12.0)]
    return pl.DataFrame(rows, schema=["level", "statistic", "metric", "size_bin", "estimator", "value"], orient="row")


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_zero_bars_are_marked_on_log_axes() -> None:
    fig = figures.error_by_level_figure(metrics(), LEVELS)
    try:
        for ax in fig.axes:
            assert ax.get_yscale() == "log"
            markers = [ln for ln in ax.lines if ln.get_marker() == "v" and len(ln.get_xdata())]
            # published at nation and state: exactly the two zero bars, each at its bar's x
            bar_x = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches if p.get_height() == 0)
            assert sorted(float(ln.get_xdata()[0]) for ln in markers) == pytest.approx(bar_x)
            assert len(markers) == 2
            assert [t.get_text() for t in ax.texts].count("0") == 2
            assert any("no error" in t.get_text() for t in ax.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_labels_do_not_overlap() -> None:
    fig = figures.error_by_level_figure(metrics(), LEVELS)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        left, right = fig.axes
        for ax in fig.axes:
            ticks = [t.get_window_extent(r) for t in ax.get_xticklabels() if t.get_text()]
            assert len(ticks) == len(LEVELS)
            for a, b in itertools.combinations(ticks, 2):
                assert not _overlap(a, b), "x tick labels collide"
            ylab = ax.yaxis.label.get_window_extent(r)
            for t in ax.get_yticklabels(which="both"):
                if t.get_text():
                    assert not _overlap(ylab, t.get_window_extent(r)), "y label overlaps its tick labels"
        # the RMSE panel's axis label stays clear of the MAE panel
        assert not _overlap(right.yaxis.label.get_window_extent(r), left.get_tightbbox(r))
    finally:
        plt.close(fig)


def test_target_figure_highlights_results_below_the_target() -> None:
    fig = figures.target_figure(metrics(), LEVELS, TARGET_WITHIN_5PP)
    try:
        ax = fig.axes[0]
        assert any(np.allclose(ln.get_ydata(), 95) for ln in ax.lines)  # the target line
        bars = [p for p in ax.patches if p.get_height() > 0]
        below = [p for p in bars if p.get_height() < 95]
        assert below and all(p.get_hatch() == "//" for p in below)
        assert not any(p.get_hatch() for p in bars if p.get_height() >= 95)
        assert "86.1%" in [t.get_text() for t in ax.texts]
        assert [t.get_text() for t in ax.texts].count("n/a") == 3  # nation: no unit of >= 500 persons
    finally:
        plt.close(fig)


def test_report_target_table_highlights_and_names_levels_below_target() -> None:
    m = metrics()
    look = {(a, b, c, d, e): v for a, b, c, d, e, v in m.iter_rows()}
    ctx = target_context(look, LEVELS, ["published", "noisy_clipped", "wls"])
    assert ctx["below"] == ["block_group (93.0% published)", "block (86.1% published)"]
    block = next(r for r in ctx["table"]["rows"] if r[0]["text"] == "block")
    assert block[2] == {"text": "▼ 86.1%", "cls": "below", "title": "below the 95% target"}
    state = next(r for r in ctx["table"]["rows"] if r[0]["text"] == "state")
    assert state[2]["cls"] == "meets" and state[2]["text"] == "100.0%"


def test_report_escapes_configured_values_and_highlights_in_html(tmp_path) -> None:
    run = make_run(tmp_path, confidential=True, seed=3)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["title"] = "Review <script>alert(1)</script>"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    html = review_run_dir(run).read_text()
    assert "<script" not in html.lower()
    assert "Review &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert re.search(r"<h1>dptab review — Review &lt;script&gt;", html)
    assert "Redistricting target" in html and "2020 target: ≥ 95%" in html
