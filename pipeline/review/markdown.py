"""Markdown summary of a review's metrics (``RUN_DIR/review/summary.md``, and ACCURACY.md).

The tables focus on the margins a reviewer reads first: total population, voting age,
Hispanic and the 7 non-Hispanic race groups (P2 lines 1, 2, 5–11 and P3 line 1), per geolevel,
for the published counts; then published vs raw noisy (clipped) vs WLS for total population;
bias by true-size bin; the redistricting target; sparsity. Like every review output it is
derived from the truth (confidential unless the run's input is marked non-confidential).
"""

from __future__ import annotations

import polars as pl

from pipeline.review.metrics import ALL_BIN, SIZE_BINS

MARGINS: tuple[tuple[str, str], ...] = (
    ("total", "Total population"), ("voting_age", "Voting age (18+)"), ("P2_002", "Hispanic"),
    ("P2_005", "NH White alone"), ("P2_006", "NH Black alone"), ("P2_007", "NH AIAN alone"),
    ("P2_008", "NH Asian alone"), ("P2_009", "NH NHPI alone"), ("P2_010", "NH Some Other Race alone"),
    ("P2_011", "NH Two or more races"),
)


def _num(v: float | None, digits: int = 2) -> str:
    if v is None or v != v:
        return "–"
    return f"{v:.{digits}f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def markdown_summary(metrics: pl.DataFrame, levels: list[str] | None = None) -> str:
    """Markdown tables of the headline metrics (see module docstring) from a metrics frame."""
    look = {(a, b, c, d, e): v for a, b, c, d, e, v in zip(*[metrics[k].to_list() for k in
            ("level", "statistic", "metric", "size_bin", "estimator", "value")])}
    present = list(dict.fromkeys(metrics["level"].to_list()))
    levels = [lv for lv in (levels or present) if lv in present]
    stats = list(dict.fromkeys(metrics["statistic"].to_list()))
    margins = MARGINS if "P2_002" in stats else tuple(
        (s, s) for s in stats if s not in ("detailed", "largest_group", "all_lines", "occupied_units", "vacant_units"))

    def g(lv, s, m, b=ALL_BIN, e="published"):
        return look.get((lv, s, m, b, e))

    parts = []
    for metric, title in (("mae", "Mean absolute error (persons), published counts"),
                          ("rmse", "Root mean squared error (persons), published counts"),
                          ("bias", "Mean signed error (published − true, persons)"),
                          ("p95_abs", "95th percentile of the absolute error (persons)"),
                          ("max_abs", "Maximum absolute error (persons)"),
                          ("mape_500", "Mean absolute percent error, units with ≥ 500 persons (%)")):
        rows = [[label] + [_num(g(lv, s, metric)) for lv in levels] for s, label in margins]
        parts.append(f"**{title}**\n\n" + _md(["margin"] + levels, rows))
    rows = []
    for lv in levels:
        rows.append([lv] + [f"{_num(g(lv, 'total', 'mae', ALL_BIN, e))} / {_num(g(lv, 'total', 'bias', ALL_BIN, e))}"
                            for e in ("published", "noisy_clipped", "wls")])
    parts.append("**Total population, MAE / bias by estimator** (same noisy measurements)\n\n"
                 + _md(["level", "published", "raw noisy clipped at 0", "unconstrained WLS"], rows))
    low = [lv for lv in ("block_group", "block") if lv in levels]
    rows = []
    for b in [x[0] for x in SIZE_BINS]:
        row = [b]
        for lv in low:
            n = g(lv, "total", "n", b)
            row.append("–" if n is None else f"{int(n)}: {_num(g(lv, 'total', 'bias', b))} / {_num(g(lv, 'total', 'mae', b))}")
        rows.append(row)
    parts.append("**Total population by true size: units: bias / MAE (published)**\n\n"
                 + _md(["true size"] + low, rows))
    rows = []
    for lv in levels:
        n = g(lv, "largest_group", "n")
        rows.append([lv, "–" if n is None else str(int(n))]
                    + [("–" if (v := g(lv, "largest_group", "within_5pp_share", ALL_BIN, e)) is None or v != v
                        else f"{100 * v:.1f}%") for e in ("published", "noisy_clipped", "wls")])
    parts.append("**Redistricting target**: share of units with ≥ 500 persons whose largest race/ethnic group "
                 "is within 5 percentage points of its true share (2020 target ≥ 95%)\n\n"
                 + _md(["level", "units ≥ 500", "published", "noisy clipped", "WLS"], rows))
    rows = [[lv] + [("–" if (v := g(lv, "detailed", k, ALL_BIN, e)) is None or v != v else f"{100 * v:.2f}%")
                    for e in ("published", "noisy_clipped") for k in ("false_nonzero_share", "false_zero_share")]
            for lv in levels]
    parts.append("**Sparsity of the 2,016 detailed cells**\n\n"
                 + _md(["level", "true 0 → published ≠ 0", "true ≠ 0 → published 0",
                        "true 0 → noisy ≠ 0", "true ≠ 0 → noisy 0"], rows))
    return "\n".join(parts)


def experiment_markdown(summary: pl.DataFrame, levels: tuple[str, ...] = ("county", "tract", "block_group", "block"),
                        margins: tuple[tuple[str, str], ...] = MARGINS[:3] + (MARGINS[3], MARGINS[4], MARGINS[6],
                                                                             MARGINS[9])) -> str:
    """Markdown tables of an experiment's ``summary.parquet``: mean ± sd over trials per setting
    (columns ordered by ε) of the published MAE per margin and level, the redistricting target
    at the lowest level, block bias by true size, and total MAE by estimator per setting."""
    look = {(r["setting"], r["level"], r["statistic"], r["metric"], r["size_bin"], r["estimator"]): r
            for r in summary.iter_rows(named=True)}
    settings = (summary.select("setting", "rho", "epsilon").unique().sort("epsilon").iter_rows(named=True))
    settings = [(s["setting"], f"ρ = {s['rho']} (ε {s['epsilon']:.2f})" if s["setting"].startswith("rho=")
                 else f"{s['setting']}: ρ = {s['rho']} (ε {s['epsilon']:.2f})") for s in settings]
    head = [n for _, n in settings]

    def cell(key: tuple, scale: float = 1.0, digits: int = 2) -> str:
        r = look.get(key)
        if r is None:
            return "–"
        sd = r["sd"] * scale if r["sd"] == r["sd"] else float("nan")
        return f"{r['mean'] * scale:.{digits}f} ± {_num(sd, digits)}"

    n_trials = int(summary["trials"].max()) if summary.height else 0
    parts = [f"**MAE of the published counts (persons), mean ± sd over {n_trials} trials**\n\n"
             + _md(["margin", "level"] + head,
                   [[label, lv] + [cell((k, lv, s, "mae", ALL_BIN, "published")) for k, _ in settings]
                    for s, label in margins for lv in levels])]
    low = levels[-1]
    parts.append(f"**Redistricting target at {low} level (share within 5 pp, %)**\n\n"
                 + _md(["level"] + head, [[lv] + [cell((k, lv, "largest_group", "within_5pp_share", ALL_BIN, "published"),
                                                       100.0, 1) for k, _ in settings] for lv in levels]))
    parts.append(f"**Bias of the {low} total population by true size (persons)**\n\n"
                 + _md(["true size"] + head, [[b] + [cell((k, low, "total", "bias", b, "published")) for k, _ in settings]
                                              for b in [x[0] for x in SIZE_BINS]]))
    rows = [[name, lv] + [cell((k, lv, "total", "mae", ALL_BIN, e)) for e in ("published", "noisy_clipped", "wls")]
            for k, name in settings for lv in levels]
    parts.append("**Total population MAE by estimator (persons)**\n\n"
                 + _md(["setting", "level", "published", "raw noisy clipped at 0", "unconstrained WLS"], rows))
    return "\n".join(parts)
