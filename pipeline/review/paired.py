"""Paired comparison of two settings of an experiment (e.g. ``--compare-estimators``).

Trial ``t`` of every setting uses the same seed — with ``--compare-estimators`` the very same
noise draws — so the two settings' metrics are compared trial by trial: for each (level,
statistic, metric, size bin) the per-trial difference ``b − a`` has mean ``d̄`` and standard error
``sd / √n``; a difference is *significant* when ``|d̄| > 2 SE`` (about 95% two-sided for ≥ 20
trials). Pure functions over the experiment's ``trials.parquet`` frame; the values are derived
from the confidential truth (see ``pipeline.review``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.review.metrics import ALL_BIN

KEYS = ["level", "statistic", "metric", "size_bin", "estimator"]


def paired_differences(trials: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """Per (level, statistic, metric, size bin, estimator): the means of settings ``a`` and ``b``
    over the trials both have, the mean paired difference ``b − a``, its standard error and
    ``significant`` (``|diff| > 2 SE``). Columns: the keys, ``a, b, diff, se, trials, significant``."""
    left = trials.filter(pl.col("setting") == a).select(KEYS + ["trial", pl.col("value").alias("va")])
    right = trials.filter(pl.col("setting") == b).select(KEYS + ["trial", pl.col("value").alias("vb")])
    j = left.join(right, on=KEYS + ["trial"]).filter(pl.col("va").is_not_nan() & pl.col("vb").is_not_nan())
    out = (j.with_columns((pl.col("vb") - pl.col("va")).alias("d"))
           .group_by(KEYS, maintain_order=True)
           .agg(pl.col("va").mean().alias("a"), pl.col("vb").mean().alias("b"), pl.col("d").mean().alias("diff"),
                (pl.col("d").std(ddof=1) / pl.len().sqrt()).fill_null(float("nan")).alias("se"),
                pl.len().alias("trials")))
    return out.with_columns(((pl.col("diff").abs() > 2 * pl.col("se")) & (pl.col("trials") > 1)).alias("significant"))


def verdict(row: dict) -> str:
    """``better`` / ``worse`` / ``same`` for setting ``b`` against ``a`` on an error metric."""
    if not row["significant"] or row["diff"] != row["diff"]:
        return "same"
    return "better" if row["diff"] < 0 else "worse"


def comparison_markdown(diffs: pl.DataFrame, a: str, b: str, levels: list[str],
                        margins: tuple[tuple[str, str], ...], metric: str = "rmse") -> str:
    """A markdown table: per margin and level, ``metric`` of the published counts under ``a`` and
    ``b``, the paired difference ± 2 SE and the verdict."""
    look = {(r["level"], r["statistic"]): r for r in diffs.filter(
        (pl.col("metric") == metric) & (pl.col("size_bin") == ALL_BIN) & (pl.col("estimator") == "published")
    ).iter_rows(named=True)}
    rows = []
    for stat, label in margins:
        for lv in levels:
            r = look.get((lv, stat))
            if r is None:
                continue
            rel = 100.0 * r["diff"] / r["a"] if r["a"] else float("nan")
            rows.append(f"| {label} | {lv} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} ± {2 * r['se']:.3f} "
                        f"({rel:+.1f}%) | {verdict(r)} |")
    head = (f"| margin | level | {a} | {b} | {b} − {a} (± 2 SE) | {b} is |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def coverage_table(summary: pl.DataFrame, levels: list[str]) -> pl.DataFrame:
    """Coverage of the published ``count ± moe90`` pooled over every table line, per setting,
    level and true-size bin: ``setting, level, size_bin, coverage, sd, median_moe90, cells``."""
    from pipeline.review.metrics import POOLED, SIZE_BINS

    s = summary.filter((pl.col("statistic") == POOLED) & pl.col("level").is_in(levels))
    piv = {(r["setting"], r["level"], r["size_bin"], r["metric"]): r for r in s.iter_rows(named=True)}
    rows = []
    for setting in s["setting"].unique(maintain_order=True).to_list():
        for lv in levels:
            for b in [ALL_BIN] + [x[0] for x in SIZE_BINS]:
                c = piv.get((setting, lv, b, "moe90_coverage"))
                if c is None:
                    continue
                w = piv.get((setting, lv, b, "moe90_median"))
                n = piv.get((setting, lv, b, "n"))
                rows.append((setting, lv, b, c["mean"], c["sd"], np.nan if w is None else w["mean"],
                             np.nan if n is None else n["mean"]))
    return pl.DataFrame(rows, schema={"setting": pl.Utf8, "level": pl.Utf8, "size_bin": pl.Utf8,
                                      "coverage": pl.Float64, "sd": pl.Float64, "median_moe90": pl.Float64,
                                      "cells": pl.Float64}, orient="row")


#: the statistics of the release notes' bias table (name in the metrics, label)
BIAS_STATISTICS = (("total", "Total population"), ("P2_002", "Hispanic or Latino"), ("P2_005", "NH White alone"),
                   ("P2_006", "NH Black alone"), ("P2_008", "NH Asian alone"), ("P2_011", "NH Two or more races"))


def bias_notes(summary: pl.DataFrame, setting: str, levels: list[str]) -> dict:
    """The integer tables' mean error (published − true) by true size, per level and statistic,
    of one experiment setting: what a release's notes say about the bias of its counts. Values
    are means over trials of the per-trial mean error of the level's units in the bin."""
    from pipeline.review.metrics import SIZE_BINS

    s = summary.filter((pl.col("setting") == setting) & (pl.col("metric") == "bias")
                       & (pl.col("estimator") == "published"))
    look = {(r["level"], r["statistic"], r["size_bin"]): r["mean"] for r in s.iter_rows(named=True)}
    trials = int(summary.filter(pl.col("setting") == setting)["trials"].max() or 0)
    bins = [b[0] for b in SIZE_BINS]
    return {"setting": setting, "trials": trials, "size_bins": bins,
            "rows": [{"level": lv, "statistic": label,
                      "bias": [None if (lv, stat, b) not in look else round(float(look[(lv, stat, b)]), 2)
                               for b in bins]}
                     for lv in levels for stat, label in BIAS_STATISTICS]}
