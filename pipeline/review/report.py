"""The review report: one self-contained HTML file (inline CSS, figures as PNG data URIs).

Contents: run summary and privacy parameters; the redistricting target and sparsity per
level; metric tables per level (published, raw noisy clipped at 0, unconstrained WLS);
published-vs-true plots (counties, tracts, blocks), error by geolevel, bias by true-size bin,
the error distribution; and, when given, experiment comparisons (accuracy vs ε).

The page is the Jinja2 template ``templates/report.html.j2`` with autoescaping: every value
(a config title, a dataset or strategy name, a level) is escaped. Results below the 2020
redistricting target (:data:`TARGET_WITHIN_5PP`) are highlighted in the tables and named above them.

Confidentiality: the report is built from the truth. :func:`write_report` writes exactly the
path it is given; ``pipeline.review.runner`` only ever gives it ``RUN_DIR/review/report.html``
(or an experiment directory, also confidential), and nothing here logs or returns a value.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import polars as pl
from markupsafe import Markup

from pipeline.review import figures
from pipeline.review.metrics import ALL_BIN, HEADLINE, POOLED, SIZE_BINS

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
td.below{background:#fde8e8;color:#a00;font-weight:600}td.meets{color:#1a6b1a}
.alert{background:#fde8e8;border-left:4px solid #c00;padding:.4em .8em;font-weight:600}
span.below{color:#a00}
"""
METRIC_COLS = ("mae", "rmse", "bias", "p95_abs", "max_abs", "mape_500")
HEADLINE_NAMES = tuple(h[0] for h in HEADLINE) + ("occupied_units", "vacant_units")


#: the 2020 redistricting accuracy target: share of units (>= 500 persons) whose largest group's
#: estimated share is within 5 percentage points of its true share
TARGET_WITHIN_5PP = 0.95


@lru_cache(maxsize=1)
def template_env() -> jinja2.Environment:
    """The Jinja2 environment of the report (``pipeline/review/templates/``), autoescaping on:
    every value from a config (title, dataset, strategy) or a metric table is escaped."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _cell(v: Any, cls: str = "", title: str = "") -> dict[str, str]:
    return {"text": _fmt(v), "cls": cls, "title": title}


def _target_cell(share: float | None) -> dict[str, str]:
    """A within-5-pp share as a percentage, highlighted when below the 2020 target."""
    if share is None or share != share:
        return _cell(None)
    if share < TARGET_WITHIN_5PP:
        return _cell(f"▼ {100 * share:.1f}%", "below", f"below the {100 * TARGET_WITHIN_5PP:.0f}% target")
    return _cell(f"{100 * share:.1f}%", "meets")


def _table(header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"header": header, "rows": [[c if isinstance(c, dict) else _cell(c) for c in r] for r in rows]}


def _lookup(m: pl.DataFrame) -> dict[tuple[str, str, str, str, str], float]:
    cols = [m[c].to_list() for c in ("level", "statistic", "metric", "size_bin", "estimator", "value")]
    return {(a, b, c, d, e): v for a, b, c, d, e, v in zip(*cols)}


def summary_context(summary: dict[str, Any]) -> dict[str, Any]:
    plain = [[k, v] for k, v in summary.items() if k != "rho_by_level"]
    rho = summary.get("rho_by_level")
    return {"plain": _table(["item", "value"], plain),
            "rho": _table(["strategy", "level", "ρ (exact)", "ρ"], [list(r) for r in rho]) if rho else None}


def target_context(look: dict, levels: list[str], estimators: list[str]) -> dict[str, Any]:
    rows, below = [], []
    for lv in levels:
        n = look.get((lv, "largest_group", "n", ALL_BIN, estimators[0]))
        row: list[Any] = [lv, None if n is None or n != n else int(n)]
        for e in estimators:
            v = look.get((lv, "largest_group", "within_5pp_share", ALL_BIN, e))
            row.append(_target_cell(v))
            if e == "published" and v is not None and v == v and v < TARGET_WITHIN_5PP:
                below.append(f"{lv} ({100 * v:.1f}% published)")
        for e in ("published", "noisy_clipped"):
            for k in ("false_nonzero_share", "false_zero_share"):
                v = look.get((lv, "detailed", k, ALL_BIN, e))
                row.append(None if v is None or v != v else f"{100 * v:.2f}%")
        rows.append(row)
    header = (["level", "units ≥ 500"] + [f"within 5 pp ({e})" for e in estimators]
              + ["true-0 published ≠0", "true≠0 published 0", "true-0 noisy ≠0", "true≠0 noisy 0"])
    return {"goal": f"{100 * TARGET_WITHIN_5PP:.0f}%", "below": below, "table": _table(header, rows), "figure": None}


def level_context(look: dict, levels: list[str], estimators: list[str], statistics: list[str]) -> list[dict[str, Any]]:
    out = []
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
        out.append({"name": lv, "table": _table(header, rows)})
    return out


def experiment_context(summary: pl.DataFrame) -> dict[str, Any]:
    """Accuracy-vs-ε table (MAE of total and largest-group target per level) and plot."""
    s = summary.filter((pl.col("estimator") == "published") & (pl.col("size_bin") == ALL_BIN)
                       & (((pl.col("statistic") == "total") & (pl.col("metric").is_in(["mae", "rmse", "bias"])))
                          | ((pl.col("statistic") == "largest_group") & (pl.col("metric") == "within_5pp_share"))))
    s = s.sort(["setting", "level", "statistic", "metric"])
    rows = []
    for r in s.iter_rows(named=True):
        low = r["metric"] == "within_5pp_share" and r["mean"] == r["mean"] and r["mean"] < TARGET_WITHIN_5PP
        value = f"{r['mean']:.3g} ± {r['sd']:.2g}"
        rows.append([r["setting"], r["epsilon"], r["level"], r["statistic"], r["metric"],
                     _cell(f"▼ {value}", "below", "below the target") if low else value, r["trials"]])
    return {"figure": {"uri": figures.accuracy_vs_epsilon(summary), "caption": "Accuracy vs ε (MAE of total population)"},
            "table": _table(["setting", "ε", "level", "statistic", "metric", "mean ± sd", "trials"], rows)}


def render(title: str, confidential: bool, **sections: Any) -> str:
    """The report page: ``sections`` are the contexts above (summary, target, figures, levels, experiment)."""
    ctx = {"summary": None, "target": None, "figures": [], "levels": [], "experiment": None, "paired": None,
           "coverage": None, **sections}
    return template_env().get_template("report.html.j2").render(title=title, confidential=confidential,
                                                                css=Markup(CSS), **ctx)


def write_report(path: str | Path, data, experiment: pl.DataFrame | None = None) -> None:
    """Write the review report of a run (``data``: ``runner.ReviewData``) to ``path``."""
    m = data.metrics
    look = _lookup(m)
    levels = list(dict.fromkeys(m["level"].to_list()))
    present = set(m["estimator"].to_list())
    estimators = [e for e in ("published", "noisy_clipped", "wls") if e in present]
    figs = []
    if data.scatter:
        figs.append({"uri": figures.published_vs_true(data.scatter), "caption": "Published vs true total population"})
    figs.append({"uri": figures.error_by_level(m, levels), "caption": "MAE and RMSE of total population by geolevel"})
    stats = list(dict.fromkeys(m["statistic"].to_list()))
    pl94 = "white_alone" in stats
    bias_stats = (("hispanic", "white_alone", "black_alone", "asian_alone", "two_or_more") if pl94
                  else tuple(s for s in stats if s not in ("total", "detailed", "largest_group", POOLED))[:5])
    figs.append({"uri": figures.bias_by_bin(m, levels, bias_stats), "caption": "Bias by true-size bin"})
    figs.append({"uri": figures.error_distribution({k: v for k, v in data.errors.items() if k != "nation"}),
                 "caption": "Distribution of published − true total population"})
    target = target_context(look, levels, estimators)
    target["figure"] = {"uri": figures.target_by_level(m, levels, TARGET_WITHIN_5PP),
                        "caption": f"Redistricting target by level: bars below {target['goal']} are hatched red"}
    title = f"dptab review — {data.summary.get('title') or data.summary.get('run')}"
    Path(path).write_text(render(
        title, bool(data.summary.get("confidential", True)), summary=summary_context(data.summary),
        target=target, figures=figs,
        levels=level_context(look, levels, estimators, list(HEADLINE_NAMES) if pl94 else
                             [s for s in stats if s not in ("detailed", "largest_group", POOLED)]),
        experiment=experiment_context(experiment) if experiment is not None and experiment.height else None))


def paired_context(paired: pl.DataFrame, a: str, b: str, levels: list[str]) -> dict[str, Any]:
    """Two paired settings side by side: per margin and level, RMSE, MAE and bias of each, the
    paired RMSE difference ± 2 SE with its verdict, and the relative-change figure."""
    from pipeline.review.markdown import MARGINS
    from pipeline.review.paired import verdict

    look = {(r["level"], r["statistic"], r["metric"]): r
            for r in paired.filter((pl.col("size_bin") == ALL_BIN) & (pl.col("estimator") == "published"))
            .iter_rows(named=True)}
    rows = []
    for stat, label in MARGINS:
        for lv in levels:
            r = look.get((lv, stat, "rmse"))
            if r is None:
                continue
            mae, bias = look.get((lv, stat, "mae")), look.get((lv, stat, "bias"))
            v = verdict(r)
            rows.append([label, lv, _fmt(r["a"]), _fmt(r["b"]),
                         _cell(f"{r['diff']:+.3g} ± {2 * r['se']:.2g}", "below" if v == "worse" else "", v),
                         v, _fmt(mae["a"] if mae else None), _fmt(mae["b"] if mae else None),
                         _fmt(bias["a"] if bias else None), _fmt(bias["b"] if bias else None)])
    bias_rows = []
    for lv in levels:
        for size in [x[0] for x in SIZE_BINS]:
            r = next((x for x in paired.filter((pl.col("level") == lv) & (pl.col("statistic") == "total")
                                               & (pl.col("metric") == "bias") & (pl.col("size_bin") == size)
                                               & (pl.col("estimator") == "published")).iter_rows(named=True)), None)
            if r is not None:
                bias_rows.append([lv, size, _fmt(r["a"]), _fmt(r["b"]), f"{r['diff']:+.3g} ± {2 * r['se']:.2g}"])
    return {"title": f"{b} vs {a} (paired trials)",
            "bias": _table(["level", "true size", f"bias {a}", f"bias {b}", "difference ± 2 SE"], bias_rows),
            "figure": {"uri": figures.paired_change(paired, levels, MARGINS, a, b),
                       "caption": f"Change of RMSE, {b} vs {a}, per level and margin (± 2 SE of the paired difference)"},
            "table": _table(["margin", "level", f"RMSE {a}", f"RMSE {b}", "difference ± 2 SE", f"{b} is",
                             f"MAE {a}", f"MAE {b}", f"bias {a}", f"bias {b}"], rows)}


def coverage_context(coverage: pl.DataFrame, levels: list[str]) -> dict[str, Any]:
    """Coverage of the published count ± moe90 per setting, level and true-size bin."""
    rows = [[r["setting"], r["level"], r["size_bin"],
             _cell(f"{100 * r['coverage']:.1f}%", "" if 0.88 <= r["coverage"] <= 0.92 else "below",
                   "goal 88–92%"), _fmt(r["median_moe90"]), _fmt(r["cells"])]
            for r in coverage.iter_rows(named=True)]
    return {"figure": {"uri": figures.coverage_by_bin(coverage, levels),
                       "caption": "Coverage of count ± moe90 by true size (goal band 88–92%)"},
            "table": _table(["setting", "level", "true size", "coverage", "median moe90", "cells per trial"], rows)}


def write_experiment_report(path: str | Path, summary: pl.DataFrame, info: dict[str, Any],
                            confidential: bool, paired: tuple[str, str, pl.DataFrame] | None = None,
                            coverage: pl.DataFrame | None = None) -> None:
    """Write the report of an experiment directory (``dptab experiment``) to ``path``; with two
    paired settings (``(first, second, pipeline.review.paired.paired_differences frame)``) also
    their side-by-side comparison, and the margins' coverage when known."""
    levels = [lv for lv in ("nation", "state", "county", "tract", "block_group", "block")
              if lv in set(summary["level"].to_list())] or list(dict.fromkeys(summary["level"].to_list()))
    extra: dict[str, Any] = {}
    if paired is not None and paired[2].height:
        extra["paired"] = paired_context(paired[2], paired[0], paired[1], [lv for lv in levels if lv != "nation"])
    if coverage is not None and coverage.height:
        extra["coverage"] = coverage_context(coverage, levels)
    Path(path).write_text(render(f"dptab experiment — {info.get('dataset')}", confidential,
                                 summary=summary_context(info), experiment=experiment_context(summary), **extra))
