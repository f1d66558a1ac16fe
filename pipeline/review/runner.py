"""``dptab review RUN_DIR``: metrics of a finished run against its confidential truth.

Reads, from the run directory (docs/contracts.md, pipeline/run.py):
``histograms/persons_<level>.parquet`` (truth), ``solved/persons_<level>.parquet``
(published), ``measurements/persons/<level>/*.parquet`` (noisy answers, for the comparators),
and for housing units ``histograms/units_<level>.parquet`` / ``solved/units_<level>.parquet``.
Writes ``RUN_DIR/review/metrics.parquet``, ``summary.md`` and ``report.html`` (see
``pipeline.review`` for the confidentiality rule) and returns their paths only.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from pipeline.errors import InputError, RefusedError
from pipeline.job.rundir import RunDir
from pipeline.model.schemas import parse_yaml
from pipeline.model.spec import load_spec
from pipeline.review.comparators import (
    has_rows,
    load_measurements,
    noisy_clipped_detailed,
    noisy_clipped_statistics,
    wls_statistics,
)
from pipeline.review.metrics import (
    HEADLINE,
    METRICS_SCHEMA,
    Statistics,
    coverage_rows,
    error_table,
    is_pl94_tables,
    level_metrics,
    sparsity,
    sparsity_rows,
    statistic_vectors,
)

PUBLISHED = "published"
NOISY = "noisy_clipped"
WLS = "wls"
GLS = "gls_unbiased"
ESTIMATORS = (PUBLISHED, NOISY, WLS, GLS)
#: Levels whose published-vs-true scatter goes into the report.
SCATTER_LEVELS = ("county", "tract", "block")


class ReviewError(InputError):
    """The run directory lacks what the review needs (names the missing file)."""


class ConfidentialityError(RefusedError, PermissionError):
    """A truth-based output was about to leave the run directory of a confidential run."""


@dataclass
class ReviewData:
    """What the report draws from: metrics plus a few per-unit arrays (all confidential).

    ``scatter[level] = (true_total, published_total)`` float64 ``(n_units,)`` each;
    ``errors[level] = published - true`` total population per unit.
    """

    metrics: pl.DataFrame
    summary: dict[str, Any]
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    errors: dict[str, np.ndarray] = field(default_factory=dict)


def _read_config(run_dir: Path) -> dict[str, Any]:
    p = RunDir(run_dir).config_path
    if not p.is_file():
        raise ReviewError(f"{run_dir}: no config.yaml (not a dptab run directory)")
    return parse_yaml(p.read_text()) or {}


def is_confidential(run_dir: str | Path) -> bool:
    """True unless the run's config says ``confidential: false`` (the default is confidential)."""
    return bool(_read_config(Path(run_dir)).get("confidential", True))


def _levels(run_dir: Path) -> list[str]:
    from pipeline.model.geography import load_geolevels

    levels = (_read_config(run_dir).get("geography") or {}).get("levels", "geolevels")
    names = list(levels) if isinstance(levels, list) else [lv.name for lv in load_geolevels(levels)]
    rd = RunDir(run_dir)
    return [n for n in names if rd.truth_path("persons", n).is_file()]


def _hist(path: Path):
    from pipeline.model.histogram import SparseHistogram

    if not path.is_file():
        raise ReviewError(f"{path}: missing (has the run finished this level?)")
    return SparseHistogram.from_parquet(path)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Run and privacy parameters for the report header (public facts only)."""

    from pipeline.model.strategy import load_strategy
    from pipeline.privacy.accounting import cks_epsilon

    cfg = _read_config(run_dir)
    state = RunDir(run_dir).state() if RunDir(run_dir).state_path.is_file() else {}
    priv = cfg.get("privacy", {}) or {}
    out: dict[str, Any] = {
        "run": run_dir.name, "dataset": cfg.get("dataset_id"), "title": cfg.get("title"),
        "confidential": bool(cfg.get("confidential", True)), "created": state.get("created"),
        "randomness": priv.get("randomness"), "delta": priv.get("delta"),
        "persons strategy": priv.get("strategy"), "units strategy": priv.get("units_strategy"),
    }
    rho_rows = []
    total = 0
    for kind in ("strategy", "units_strategy"):
        name = priv.get(kind)
        if not name:
            continue
        s = load_strategy(name)
        total += s.total_rho
        for lv in s.level_names:
            rho_rows.append((s.name, lv, str(s.level_rho(lv)), float(s.level_rho(lv))))
    if total:
        out["rho (total)"] = f"{total} ≈ {float(total):.4f}"
        out["epsilon at delta"] = f"{float(cks_epsilon(total, str(priv.get('delta', '1e-10')))):.4f}"
    out["rho_by_level"] = rho_rows
    return out


def _units_metrics(run_dir: Path, level: str) -> pl.DataFrame | None:
    """Occupied / vacant housing-unit errors (published units run vs truth), if both exist."""
    rd = RunDir(run_dir)
    t_path, p_path = rd.truth_path("units", level), rd.solved_path("units", level)
    if not (t_path.is_file() and p_path.is_file()):
        return None
    truth = _hist(t_path).dense().astype(np.float64)
    pub = _hist(p_path)
    est = np.zeros_like(truth)
    np.add.at(est, (pub.unit, pub.cell), pub.count)
    rows = [(level, s, m, b, PUBLISHED, v)
            for (s, m, b), v in error_table(truth, est, truth.sum(axis=1), ["vacant_units", "occupied_units"]).items()]
    return pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")


def compute_review(run_dir: str | Path, stats: Statistics | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> ReviewData:
    """All metrics of a finished run (every level, estimator and statistic) plus plot arrays.
    ``progress(label, done, total)`` is called after each level."""
    run_dir = Path(run_dir)
    tables = str(_read_config(run_dir).get("tables", "pl94"))
    stats = stats or statistic_vectors(tables)
    spec = load_spec(str(_read_config(run_dir).get("spec", "pl94")))
    levels = _levels(run_dir)
    if not levels:
        raise ReviewError(f"{run_dir}/histograms: no persons histograms (run the inputs stage first)")
    frames: list[pl.DataFrame] = []
    data = ReviewData(pl.DataFrame(schema=METRICS_SCHEMA), run_summary(run_dir))
    ti = stats.index("total")
    margins, unbiased = _published_margins(run_dir, stats, tables)
    for level in levels:
        truth = _hist(RunDir(run_dir).truth_path("persons", level))
        pub = _hist(RunDir(run_dir).solved_path("persons", level))
        tv = stats.values(truth)
        estimates = {PUBLISHED: stats.values(pub)}
        meas = load_measurements(run_dir, "persons", level)
        measured = has_rows(meas)
        if measured:
            estimates[NOISY] = noisy_clipped_statistics(meas, spec, stats, truth.n_units)
            estimates[WLS] = wls_statistics(meas, spec, stats, truth.n_units)
        if level in unbiased:
            estimates[GLS] = unbiased[level]
        frames.append(level_metrics(level, stats, tv, estimates))
        if level in margins:
            frames.append(coverage_rows(level, stats.names, tv, estimates[PUBLISHED], margins[level]))
        frames.append(sparsity_rows(level, PUBLISHED, sparsity(truth, pub, spec.structural_zero_mask)))
        noisy_det = noisy_clipped_detailed(meas, spec, truth.n_units) if measured else None
        if noisy_det is not None:
            frames.append(sparsity_rows(level, NOISY, sparsity(truth, noisy_det, spec.structural_zero_mask)))
        u = _units_metrics(run_dir, level)
        if u is not None:
            frames.append(u)
        data.errors[level] = estimates[PUBLISHED][:, ti] - tv[:, ti]
        if level in SCATTER_LEVELS or (not set(SCATTER_LEVELS) & set(levels) and level != levels[0]):
            data.scatter[level] = (tv[:, ti], estimates[PUBLISHED][:, ti])
        if progress is not None:
            progress("review: levels", levels.index(level) + 1, len(levels))
    data.metrics = pl.concat(frames, how="vertical")
    return data


def _statistic_lines(stats: Statistics, ts: Any = None) -> list[tuple[str, int]]:
    """The (table, line) of every statistic: headline names, then ``P1_001``-style names
    (``total`` of other table shells: their persons total line)."""
    head = {name: (table, line) for name, table, line in HEADLINE}
    if ts is not None and not is_pl94_tables(ts):
        total = ts.total_line("persons")
        head = {"total": total} if total is not None else {}
    out = []
    for name in stats.names:
        if name in head:
            out.append(head[name])
        else:
            table, line = name.split("_")
            out.append((table, int(line)))
    return out


def _published_margins(run_dir: Path, stats: Statistics,
                       tables: str = "pl94") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per level, the release's margins of error of every statistic (float ``(n_units, n_stats)``,
    as ``dptab run`` would publish them for this run's design, geography and estimator) and, with
    the full estimator, its unbiased estimates (levels above the bottom one). Empty when the run
    directory cannot say (an older run)."""
    from pipeline.job.context import RunContext
    from pipeline.model.design import design
    from pipeline.release.manifest import release_margins
    from pipeline.release.tables import load_tables

    try:
        ctx = RunContext.load(run_dir)
        geo = ctx.geography
    except Exception:  # noqa: BLE001 - a review of an older or partial run still reports errors
        return {}, {}
    ts = load_tables(tables)
    levels = [lv.name for lv in geo.levels]
    digits = {lv.name: lv.digits for lv in geo.levels}
    moe = release_margins(ts, design(ctx.strategies).variances(), levels, digits, ctx.cfg.invariants.state_totals,
                          ctx.cfg.invariants.block_housing_units, ctx.cfg.postprocess.estimator,
                          [lv.child_ptr for lv in geo.levels[:-1]])
    simulated = None
    if ctx.cfg.output.margins == "simulated" and ctx.rd.is_done("margins"):
        from pipeline.model.histogram import SparseHistogram
        from pipeline.release.tables import tabulate
        from pipeline.release.uncertainty import simulated_moe90

        lookup = pl.read_parquet(ctx.rd.verified(ctx.rd.simulated_margins_path))
        moving = pl.read_parquet(ctx.rd.verified(ctx.rd.moving_cells_path))
        simulated = {}
        for lv in geo.levels:
            hist = SparseHistogram.from_parquet(ctx.rd.verified(ctx.rd.solved_path("persons", lv.name)))
            for t in ts.of_kind("persons"):
                simulated[(t.name, lv.name)] = simulated_moe90(lookup, moving, t, lv.name, tabulate(hist, t))
        moe = {**moe, **simulated}
    lines = _statistic_lines(stats, ts)
    margins, unbiased = {}, {}
    line_est = {}
    if ctx.cfg.postprocess.estimator == "full" and ctx.rd.is_done("estimate:persons"):
        from pipeline.job.estimate import LineEstimates

        line_est = dict(LineEstimates(ctx, ["persons"]))
    for lv in geo.levels:
        cols, ucols = [], []
        for table, line in lines:
            t = ts.tables[table]
            m = moe[(table, lv.name)]
            cols.append(m[:, t.index(line)] if m.ndim == 2 else np.full(lv.n_units, m[t.index(line)]))
            if (table, lv.name) in line_est:
                ucols.append(line_est[(table, lv.name)][:, t.index(line)])
        margins[lv.name] = np.stack(cols, axis=1)
        if len(ucols) == len(lines):
            unbiased[lv.name] = np.stack(ucols, axis=1)
    return margins, unbiased


def _private_write(path: Path, write) -> None:
    """Write a confidential file with mode 0600 via a temp file + rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def review_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/review`` (created with mode 0700)."""
    d = RunDir(Path(run_dir)).review_dir
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def review_run_dir(run_dir: str | Path, experiment: str | Path | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write ``metrics.parquet``, ``summary.md`` and ``report.html`` under ``RUN_DIR/review``;
    return the report path.

    ``experiment``: an experiment directory (``dptab experiment``) whose summary is added
    to the report. Only paths are returned — never a metric value (confidentiality rule).
    """
    from pipeline.review.report import write_report

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    data = compute_review(run_dir, progress=progress)
    out = review_dir(run_dir)
    _private_write(out / "metrics.parquet", lambda p: data.metrics.write_parquet(p))
    exp = None
    if experiment is not None:
        exp_path = Path(experiment) / "summary.parquet"
        if not exp_path.is_file():
            raise ReviewError(f"{exp_path}: missing (not a finished experiment directory)")
        exp = pl.read_parquet(exp_path)
    from pipeline.review.markdown import markdown_summary

    _private_write(out / "summary.md", lambda p: p.write_text(markdown_summary(data.metrics)))
    data.summary["review seconds"] = round(time.perf_counter() - t0, 1)
    report = out / "report.html"
    _private_write(report, lambda p: write_report(p, data, experiment=exp))
    return report


def export_review(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy ``RUN_DIR/review`` to ``dest`` — allowed only for a run marked non-confidential.

    Raises :class:`ConfidentialityError` for a confidential run (the default), whatever ``dest``.
    """
    run_dir = Path(run_dir)
    if is_confidential(run_dir):
        raise ConfidentialityError(f"{run_dir}: the input is confidential; its truth-based review "
                                   "stays in the run directory (set `confidential: false` only for "
                                   "synthetic or public input)")
    src = RunDir(run_dir).review_dir
    if not (src / "report.html").is_file():
        raise ReviewError(f"{src}: no review yet (run `dptab review {run_dir}`)")
    dest = Path(dest)
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest
