"""The review report: one self-contained HTML file (inline CSS, figures as PNG data URIs).

Contents: run summary and privacy parameters; the redistricting target and sparsity per
level; metric tables per level (published, raw noisy clipped at 0, unconstrained WLS);
published-vs-true plots (counties, tracts, blocks), error by geolevel, bias by true-size bin,
the error distribution; and, when given, experiment comparisons (accuracy vs ε).

Confidentiality: the report is built from the truth. :func:`write_report` writes exactly the
path it is given; ``pipeline.review.runner`` only ever gives it ``RUN_DIR/review/report.html``
(or an experiment directory, also confidential), and nothing here logs or returns a value.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.review import figures
from pipeline.review.metrics import ALL_BIN, HEADLINE

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.banner{background:#fde8e8;border:1px solid #e0a0a0;padding:.6em 1em;font-weight:600}
.public{background:#e8f4fd;border-color:#a0c4e0}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#555}
.note{font-size:.85em;color:#555}
"""
METRIC_COLS = ("mae", "rmse", "bias", "p95_abs", "max_abs", "mape_500")
HEADLINE_NAMES = tuple(h[0] for h in HEADLINE) + ("occupied_units", "vacant_units")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _lookup(m: pl.DataFrame) -> dict[tuple[str, str, str, str, str], float]:
    cols = [m[c].to_list() for c in ("level", "statistic", "metric", "size_bin", "estimator", "value")]
    return {(a, b, c, d, e): v for a, b, c, d, e, v in zip(*cols)}


def summary_section(summary: dict[str, Any]) -> str:
    plain = [[k, v] for k, v in summary.items() if k != "rho_by_level"]
    out = "<h2>Run summary and privacy parameters</h2>" + _table(["item", "value"], plain)
    if summary.get("rho_by_level"):
        out += _table(["strategy", "level", "ρ (exact)", "ρ"], [list(r) for r in summary["rho_by_level"]])
    return out


def target_section(look: dict, levels: list[str], estimators: list[str]) -> str:
    rows = []
    for lv in levels:
        n = look.get((lv, "largest_group", "n", ALL_BIN, estimators[0]))
        row: list[Any] = [lv, None if n is None or n != n else int(n)]
        for e in estimators:
            v = look.get((lv, "largest_group", "within_5pp_share", ALL_BIN, e))
            row.append(None if v is None or v != v else f"{100 * v:.1f}%")
        for e in ("published", "noisy_clipped"):
            for k in ("false_nonzero_share", "false_zero_share"):
                v = look.get((lv, "detailed", k, ALL_BIN, e))
                row.append(None if v is None or v != v else f"{100 * v:.2f}%")
        rows.append(row)
    header = (["level", "units ≥ 500"] + [f"within 5 pp ({e})" for e in estimators]
              + ["true-0 published ≠0", "true≠0 published 0", "true-0 noisy ≠0", "true≠0 noisy 0"])
    return ("<h2>Redistricting target and sparsity</h2><p class='note'>Share of units with ≥ 500 persons "
            "whose largest race/ethnic group (Hispanic; non-Hispanic White, Black, AIAN, Asian, NHPI, "
            "other, two or more) has an estimated share within 5 percentage points of its true share "
            "(2020 target: ≥ 95%). Sparsity over every detailed cell of the level (structural zeros "
            "excluded).</p>" + _table(header, rows))


def level_sections(look: dict, levels: list[str], estimators: list[str], statistics: list[str]) -> str:
    out = ["<h2>Metric tables per level</h2><p class='note'>Errors are estimate − truth in persons "
           "(housing units for the *_units rows), over all units of the level. MAPE: units with ≥ 500 "
           "persons and a positive true count, in percent. Every P1–P4 line and every size bin is "
           "in <code>metrics.parquet</code>.</p>"]
    for lv in levels:
        rows = []
        for s in statistics:
            if (lv, s, "mae", ALL_BIN, "published") not in look:
                continue
            row: list[Any] = [s] + [look.get((lv, s, m, ALL_BIN, "published")) for m in METRIC_COLS]
            row += [look.get((lv, s, "mae", ALL_BIN, e)) for e in estimators if e != "published"]
            rows.append(row)
        header = (["statistic"] + [f"{m} (published)" for m in METRIC_COLS]
                  + [f"mae ({e})" for e in estimators if e != "published"])
        out.append(f"<h3>{html.escape(lv)}</h3>" + _table(header, rows))
    return "".join(out)


def experiment_section(summary: pl.DataFrame) -> str:
    """Accuracy-vs-ε table (MAE of total and largest-group target per level) and plot."""
    s = summary.filter((pl.col("estimator") == "published") & (pl.col("size_bin") == ALL_BIN)
                       & (((pl.col("statistic") == "total") & (pl.col("metric").is_in(["mae", "rmse", "bias"])))
                          | ((pl.col("statistic") == "largest_group") & (pl.col("metric") == "within_5pp_share"))))
    s = s.sort(["setting", "level", "statistic", "metric"])
    rows = [[r["setting"], r["epsilon"], r["level"], r["statistic"], r["metric"],
             f"{r['mean']:.3g} ± {r['sd']:.2g}", r["trials"]] for r in s.iter_rows(named=True)]
    return ("<h2>Experiment comparisons</h2><p class='note'>Each setting repeats noise and post-processing "
            "on the same true histograms; mean ± standard deviation over trials.</p>"
            + _figure(figures.accuracy_vs_epsilon(summary), "Accuracy vs ε (MAE of total population)")
            + _table(["setting", "ε", "level", "statistic", "metric", "mean ± sd", "trials"], rows))


def banner(confidential: bool) -> str:
    if confidential:
        return ("<p class='banner'>CONFIDENTIAL — internal review. Every figure here is computed from "
                "the confidential input; it stays in the run directory and is never published.</p>")
    return ("<p class='banner public'>Input marked non-confidential (synthetic or public data): this review "
            "may be shared.</p>")


def page(title: str, confidential: bool, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{banner(confidential)}{body}</body></html>")


def write_report(path: str | Path, data, experiment: pl.DataFrame | None = None) -> None:
    """Write the review report of a run (``data``: ``runner.ReviewData``) to ``path``."""
    m = data.metrics
    look = _lookup(m)
    levels = list(dict.fromkeys(m["level"].to_list()))
    present = set(m["estimator"].to_list())
    estimators = [e for e in ("published", "noisy_clipped", "wls") if e in present]
    parts = [summary_section(data.summary), target_section(look, levels, estimators), "<h2>Figures</h2>"]
    if data.scatter:
        parts.append(_figure(figures.published_vs_true(data.scatter), "Published vs true total population"))
    parts.append(_figure(figures.error_by_level(m, levels), "MAE and RMSE of total population by geolevel"))
    parts.append(_figure(figures.bias_by_bin(m, levels, ("hispanic", "white_alone", "black_alone", "asian_alone",
                                                         "two_or_more")), "Bias by true-size bin"))
    parts.append(_figure(figures.error_distribution({k: v for k, v in data.errors.items() if k != "nation"}),
                         "Distribution of published − true total population"))
    parts.append(level_sections(look, levels, estimators, list(HEADLINE_NAMES)))
    if experiment is not None and experiment.height:
        parts.append(experiment_section(experiment))
    title = f"dptab review — {data.summary.get('title') or data.summary.get('run')}"
    Path(path).write_text(page(title, bool(data.summary.get("confidential", True)), "".join(parts)))


def write_experiment_report(path: str | Path, summary: pl.DataFrame, info: dict[str, Any],
                            confidential: bool) -> None:
    """Write the report of an experiment directory (``dptab experiment``) to ``path``."""
    body = summary_section(info) + experiment_section(summary)
    Path(path).write_text(page(f"dptab experiment — {info.get('dataset')}", confidential, body))
