"""Matplotlib figures of the review, returned as base64 PNG data URIs (no external assets).

Every figure drawn from truth-based metrics is confidential (see ``pipeline.review``); these
functions only return bytes for the report writer, which writes under ``RUN_DIR/review``.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # headless: no display, no GUI backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from pipeline.review.metrics import ALL_BIN, SIZE_BINS  # noqa: E402

ESTIMATOR_COLORS = {"published": "#1f77b4", "noisy_clipped": "#ff7f0e", "wls": "#2ca02c"}


def to_data_uri(fig) -> str:
    """PNG data URI of a figure (100 dpi); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def published_vs_true(scatter: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Published vs true total population, one panel per level (counties, tracts, blocks)."""
    levels = [lv for lv in ("county", "tract", "block") if lv in scatter] or list(scatter)[:3]
    fig, axes = plt.subplots(1, max(1, len(levels)), figsize=(4.2 * max(1, len(levels)), 4), squeeze=False,
                             layout="constrained")
    for ax, lv in zip(axes[0], levels):
        t, p = scatter[lv]
        ax.scatter(t, p, s=4 if t.size > 2000 else 12, alpha=0.4, color="#1f77b4", rasterized=True)
        hi = float(max(t.max(initial=1), p.max(initial=1)))
        ax.plot([0, hi], [0, hi], color="k", lw=0.8, ls="--", label="y = x")
        ax.set_title(f"{lv} (n={t.size:,})")
        ax.set_xlabel("true total population")
        ax.set_ylabel("published")
        if hi > 200:
            ax.set_xscale("symlog", linthresh=10)
            ax.set_yscale("symlog", linthresh=10)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Published vs true total population")
    return to_data_uri(fig)


def _level_ticks(ax, x: np.ndarray, labels: list[str]) -> None:
    """Level names under grouped bars, horizontal, a long name broken at its underscore
    (``block_group`` -> two lines) so that no name runs into its neighbour."""
    ax.set_xticks(x, [lab.replace("_", "\n") for lab in labels])


def _minor_log_label(v: float, _pos: int) -> str:
    """Minor ticks of a log axis labelled at 2x and 5x a power of ten only (20, 50; not 6, 7, 8, 9)."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** np.floor(np.log10(v)), 6)
    return f"{v:g}" if lead in (2.0, 5.0) else ""


def _mark_missing_bars(ax, xs: np.ndarray, vals: list[float], color: str) -> bool:
    """Zero and undefined bars are invisible (and have no height at all on a log axis): mark
    each at the foot of the axis, ``0`` with a filled triangle, undefined with ``n/a``. Returns
    True if anything was marked."""
    foot = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    marked = False
    for xi, v in zip(xs, vals):
        if v == v and v > 0:
            continue
        if v == v:  # zero (or a negative that cannot be drawn)
            ax.plot([xi], [0.03], marker="v", ms=7, color=color, mec="k", mew=0.6, transform=foot, clip_on=False,
                    zorder=5)
            ax.text(xi, 0.07, "0", transform=foot, ha="center", va="bottom", fontsize=7)
        else:
            ax.text(xi, 0.03, "n/a", transform=foot, ha="center", va="bottom", fontsize=6, color="#555")
        marked = True
    return marked


def error_by_level_figure(metrics: pl.DataFrame, levels: list[str], statistic: str = "total"):
    """The figure of :func:`error_by_level` (a matplotlib Figure, for tests and notebooks)."""
    from matplotlib.lines import Line2D

    m = metrics.filter((pl.col("statistic") == statistic) & (pl.col("size_bin") == ALL_BIN))
    ests = [e for e in ESTIMATOR_COLORS if e in set(m["estimator"].to_list())]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    x = np.arange(len(levels))
    w = 0.8 / max(1, len(ests))
    for ax, metric in zip(axes, ("mae", "rmse")):
        vals = m.filter(pl.col("metric") == metric)["value"].drop_nans().to_numpy()
        vals = vals[vals > 0]
        if vals.size and vals.max() / vals.min() > 30:  # nation vs block errors span decades
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 10, not 10^1
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        marked = False
        for k, est in enumerate(ests):
            xs = x + (k - (len(ests) - 1) / 2) * w
            ys = [_value(m, lv, metric, ALL_BIN, est) for lv in levels]
            ax.bar(xs, [y if y == y and y > 0 else 0 for y in ys], w, label=est, color=ESTIMATOR_COLORS[est])
            marked |= _mark_missing_bars(ax, xs, ys, ESTIMATOR_COLORS[est])
        _level_ticks(ax, x, levels)
        ax.set_ylabel(f"{metric.upper()} (persons)")
        ax.set_title(f"{metric.upper()} of {statistic} by geolevel")
        handles, labels = ax.get_legend_handles_labels()
        if marked:
            handles.append(Line2D([], [], ls="", marker="v", color="#999", mec="k", mew=0.6))
            labels.append("0: no error (e.g. an invariant)")
        ax.legend(handles, labels, fontsize=8)
    return fig


def error_by_level(metrics: pl.DataFrame, levels: list[str], statistic: str = "total") -> str:
    """MAE and RMSE of one statistic by geolevel, one bar per estimator; zero bars are marked."""
    return to_data_uri(error_by_level_figure(metrics, levels, statistic))


def target_figure(metrics: pl.DataFrame, levels: list[str], target: float):
    """The figure of :func:`target_by_level`."""
    m = metrics.filter((pl.col("statistic") == "largest_group") & (pl.col("metric") == "within_5pp_share")
                       & (pl.col("size_bin") == ALL_BIN))
    ests = [e for e in ESTIMATOR_COLORS if e in set(m["estimator"].to_list())]
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    x = np.arange(len(levels))
    w = 0.8 / max(1, len(ests))
    for k, est in enumerate(ests):
        xs = x + (k - (len(ests) - 1) / 2) * w
        ys = np.array([_value(m, lv, "within_5pp_share", ALL_BIN, est) for lv in levels]) * 100
        low = (ys == ys) & (ys < 100 * target)
        bars = ax.bar(xs, np.nan_to_num(ys), w, label=est, color=ESTIMATOR_COLORS[est])
        for b, y, is_low in zip(bars, ys, low):
            if is_low:  # below the target: red edge, hatched, value written on it
                b.set_edgecolor("#c00000")
                b.set_linewidth(1.6)
                b.set_hatch("//")
                ax.annotate(f"{y:.1f}%", (b.get_x() + b.get_width() / 2, y), xytext=(0, -3), textcoords="offset points",
                            ha="center", va="top", rotation=90, fontsize=7, color="#c00000", fontweight="bold",
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})
        _mark_missing_bars(ax, xs, [float("nan") if y != y else 1.0 for y in ys], ESTIMATOR_COLORS[est])
    ax.axhline(100 * target, color="#c00000", ls="--", lw=1, label=f"2020 target ({100 * target:.0f}%)")
    _level_ticks(ax, x, levels)
    ax.set_ylim(0, 105)
    ax.set_ylabel("units ≥ 500 persons within 5 pp (%)")
    ax.set_title("Largest group's share within 5 pp of the truth")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def target_by_level(metrics: pl.DataFrame, levels: list[str], target: float) -> str:
    """Share of units (≥ 500 persons) meeting the within-5-pp rule per level and estimator, with the
    target as a line and every bar below it hatched in red with its value; ``n/a``: no such unit."""
    return to_data_uri(target_figure(metrics, levels, target))


def bias_by_bin(metrics: pl.DataFrame, levels: list[str], statistics: tuple[str, ...]) -> str:
    """Mean signed error (published) by true-size bin: per level for ``total``; per statistic at the lowest level."""
    bins = [b[0] for b in SIZE_BINS]
    pub = metrics.filter((pl.col("estimator") == "published") & (pl.col("metric") == "bias"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    x = np.arange(len(bins))
    for lv in levels:
        axes[0].plot(x, [_value(pub, lv, "bias", b, "published", "total") for b in bins], marker="o", label=lv)
    axes[0].set_title("bias of total population by true size")
    low = levels[-1] if levels else ""
    for s in statistics:
        axes[1].plot(x, [_value(pub, low, "bias", b, "published", s) for b in bins], marker="o", label=s)
    axes[1].set_title(f"bias by true size at {low} level")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, bins)
        ax.set_xlabel("true count of the statistic")
        ax.set_ylabel("mean (published − true)")
        ax.legend(fontsize=7)
    return to_data_uri(fig)


def error_distribution(errors: dict[str, np.ndarray]) -> str:
    """Histogram of published − true total population per unit, one curve per level."""
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    for lv, e in errors.items():
        if e.size < 2:
            continue
        lim = max(1.0, float(np.percentile(np.abs(e), 99.5)))
        edges = np.arange(-np.ceil(lim) - 0.5, np.ceil(lim) + 1.5, max(1.0, np.ceil(lim / 40)))
        ax.hist(np.clip(e, edges[0], edges[-1]), bins=edges, histtype="step", density=True, label=f"{lv} (n={e.size:,})")
    ax.set_xlabel("published − true total population")
    ax.set_ylabel("share of units")
    ax.set_title("Error distribution (total population)")
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def accuracy_vs_epsilon(summary: pl.DataFrame, statistic: str = "total", metric: str = "mae") -> str:
    """Experiment: mean ± sd of a metric (published, all units) against ε, one line per level."""
    s = summary.filter((pl.col("statistic") == statistic) & (pl.col("metric") == metric)
                       & (pl.col("size_bin") == ALL_BIN) & (pl.col("estimator") == "published"))
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for (lv,), part in s.group_by(["level"], maintain_order=True):
        part = part.sort("epsilon")
        ax.errorbar(part["epsilon"].to_numpy(), part["mean"].to_numpy(), yerr=part["sd"].fill_nan(0).to_numpy(),
                    marker="o", capsize=3, label=str(lv))
    ax.set_xlabel("ε (persons, at δ)")
    ax.set_ylabel(f"{metric.upper()} of {statistic}")
    ax.set_yscale("log")
    ax.set_title(f"Accuracy vs ε ({metric.upper()} of {statistic}, mean ± sd over trials)")
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def _value(m: pl.DataFrame, level: str, metric: str, size_bin: str, estimator: str,
           statistic: str | None = None) -> float:
    f = m.filter((pl.col("level") == level) & (pl.col("metric") == metric) & (pl.col("size_bin") == size_bin)
                 & (pl.col("estimator") == estimator))
    if statistic is not None:
        f = f.filter(pl.col("statistic") == statistic)
    return float(f["value"][0]) if f.height else float("nan")


def paired_change(paired: pl.DataFrame, levels: list[str], margins: tuple[tuple[str, str], ...],
                  a: str, b: str, metric: str = "rmse") -> str:
    """Experiment, two paired settings: relative change of ``metric`` (``b`` vs ``a``, %) per
    level, one group of bars per margin, with ± 2 SE of the paired difference as error bars."""
    s = paired.filter((pl.col("metric") == metric) & (pl.col("size_bin") == ALL_BIN)
                      & (pl.col("estimator") == "published"))
    look = {(r["level"], r["statistic"]): r for r in s.iter_rows(named=True)}
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    width = 0.8 / max(1, len(margins))
    x = np.arange(len(levels))
    for k, (stat, label) in enumerate(margins):
        rows = [look.get((lv, stat)) for lv in levels]
        val = [100.0 * r["diff"] / r["a"] if r and r["a"] else np.nan for r in rows]
        err = [200.0 * r["se"] / r["a"] if r and r["a"] and r["se"] == r["se"] else 0.0 for r in rows]
        ax.bar(x + (k - (len(margins) - 1) / 2) * width, val, width, yerr=err, capsize=2, label=label)
    ax.axhline(0, color="black", lw=0.8)
    _level_ticks(ax, x, levels)
    ax.set_ylabel(f"{metric.upper()} change, % ({b} vs {a})")
    ax.set_title(f"{b} vs {a}: change of {metric.upper()} per level (negative = better; bars ± 2 SE)")
    ax.legend(fontsize=7, ncol=2)
    return to_data_uri(fig)


def coverage_by_bin(coverage: pl.DataFrame, levels: list[str]) -> str:
    """Experiment: coverage of ``count ± moe90`` (pooled lines) per true-size bin, one line per
    setting and level, with the 88–92% goal band."""
    bins = [b[0] for b in SIZE_BINS]
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.axhspan(88, 92, color="#2ca02c", alpha=0.15, label="goal 88–92%")
    for (setting, lv), part in coverage.filter(pl.col("size_bin") != ALL_BIN).group_by(["setting", "level"],
                                                                                       maintain_order=True):
        if lv not in levels:
            continue
        look = {r["size_bin"]: r["coverage"] for r in part.iter_rows(named=True)}
        ax.plot(range(len(bins)), [100 * look.get(b, np.nan) for b in bins], marker="o", label=f"{setting}: {lv}")
    ax.set_xticks(range(len(bins)), bins)
    ax.set_xlabel("true count of the line")
    ax.set_ylabel("coverage of count ± moe90, %")
    ax.set_title("Margin-of-error coverage by true size (all table lines pooled)")
    ax.legend(fontsize=6, ncol=2)
    return to_data_uri(fig)
