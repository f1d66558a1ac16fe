"""Comparator estimates from the same noisy measurements: raw answers clipped at 0, and WLS.

Both read one level's measurements (docs/contracts.md: rows ``unit, query, answer, value,
variance``; ``unit`` indexes the level's geoids) and return statistic values ``(n_units,
n_stats)`` for the statistics of :class:`pipeline.review.metrics.Statistics`, so they are
scored exactly like the published counts.

* **Raw noisy, clipped at 0** (``noisy_clipped``): each noisy answer is clipped at 0; a
  statistic is the sum of the clipped answers of the measured query that represents it
  (the statistic is a union of that query's answers) with the smallest variance
  ``measured answers x variance`` (answers per unit on average, skipped ones excluded) — e.g. ``total`` from the ``total`` query, a P1 line from
  ``cenrace``, a P2 line from ``hispanic*cenrace``.
* **Unconstrained weighted least squares** (``wls``): per unit, the minimiser of
  ``Σ_q ‖Q_q x − y_q‖² / v_q`` over real ``x`` (2,016 detailed cells), i.e.
  ``x = H⁻¹ Σ_q Q_qᵀ y_q / v_q`` with ``H = Σ_q Q_qᵀ Q_q / v_q`` (a pseudo-inverse when the
  design does not identify every cell). It is unbiased and ignores non-negativity,
  integrality and the parent, so it shows what post-processing gains and what bias it adds.
  Statistics are linear, so ``V x = (H⁻¹ V)ᵀ Σ_q Q_qᵀ y_q / v_q`` is computed without ever
  forming the dense ``(n_units, 2016)`` array.

Answers absent from the files (skipped because the parent's published answer is 0) count as
an observed 0: the parent's zero is exact there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from pipeline.job.rundir import RunDir
from pipeline.model.design import normal_matrix
from pipeline.model.spec import HistogramSpec
from pipeline.privacy.measure import read_measurement_rows
from pipeline.review.metrics import MetricsError, Statistics


def load_measurements(run_dir: str | Path, kind: str, level: str) -> pl.LazyFrame:
    """Every measurement row of one (run kind, level), as a lazy scan: ``unit, query, answer,
    value, variance``. Reads ``RUN_DIR/measurements/<kind>/<level>/*.parquet`` (each file's
    columns checked by the one measurement reader); empty if there are none. Lazy, because with
    every answer drawn a block level holds tens of millions of rows: the comparators take one
    query at a time."""
    files = RunDir(Path(run_dir)).measurement_files(kind, level)
    cols = ["unit", "query", "answer", "value", "variance"]
    if not files:
        return pl.LazyFrame(schema={"unit": pl.Int64, "query": pl.Utf8, "answer": pl.Int32,
                                    "value": pl.Int64, "variance": pl.Float64})
    for f in files:
        read_measurement_rows(f, ["unit"]).clear()  # the one reader's column check, on every file
    return pl.scan_parquet(files).select(cols)


def has_rows(meas: pl.LazyFrame) -> bool:
    """Whether a level's measurement scan has any row."""
    return meas.select(pl.len()).collect().item() > 0


def _queries(meas: pl.LazyFrame) -> list[str]:
    return sorted(meas.select(pl.col("query").unique()).collect()["query"].to_list())


def _per_query(meas: pl.LazyFrame, spec: HistogramSpec, n_units: int
               ) -> Iterator[tuple[str, float, sp.csr_matrix, sp.csr_matrix]]:
    """``(query, variance, Y, M)`` per measured query, one at a time: ``Y`` float ``(n_units,
    n_answers)`` noisy answers (absent = 0), ``M`` the 0/1 query matrix ``(n_answers, n_cells)``."""
    for qname in _queries(meas):
        part = meas.filter(pl.col("query") == qname).collect()
        q = spec.query(str(qname))
        var = part["variance"].to_numpy().astype(np.float64)
        if var.size == 0:
            continue
        if not np.allclose(var, var[0], rtol=1e-9, atol=0):
            raise MetricsError(f"query {qname}: variance differs between units; WLS needs one per query")
        unit = part["unit"].to_numpy().astype(np.int64)
        ans = part["answer"].to_numpy().astype(np.int64)
        if unit.size and (unit.max() >= n_units or ans.max() >= q.n_answers or unit.min() < 0 or ans.min() < 0):
            raise MetricsError(f"query {qname}: unit or answer index out of range "
                               f"({n_units} units, {q.n_answers} answers)")
        y = sp.csr_matrix((part["value"].to_numpy().astype(np.float64), (unit, ans)),
                          shape=(n_units, q.n_answers))
        yield str(qname), float(var[0]), y, q.matrix().tocsr()


def noisy_clipped_statistics(meas: pl.LazyFrame | pl.DataFrame, spec: HistogramSpec, stats: Statistics,
                             n_units: int) -> np.ndarray:
    """Statistic values from the raw noisy answers clipped at 0: float64 ``(n_units, n_stats)``.

    Statistics that no measured query represents are NaN (none, when ``detailed`` is measured).
    """
    meas = meas.lazy()
    v = stats.vectors.tocsc()
    n_stats = v.shape[1]
    best_cost = np.full(n_stats, np.inf)
    out = np.full((n_units, n_stats), np.nan)
    for qname, var, y, m in _per_query(meas, spec, n_units):
        size = np.asarray(m.sum(axis=1)).ravel()                     # cells per answer
        counts = np.asarray((m @ v).toarray())                       # (n_answers, n_stats)
        full = (counts == size[:, None]) & (size[:, None] > 0)
        valid = np.all(full | (counts == 0), axis=0)
        # variance of the sum = var x answers actually measured (skipped answers are exact 0s)
        ans = meas.filter(pl.col("query") == qname).select("answer").collect()["answer"].to_numpy()
        measured = np.bincount(ans, minlength=m.shape[0]) / max(n_units, 1)
        cost = (full * measured[:, None]).sum(axis=0) * var
        take = valid & (cost < best_cost)
        if not take.any():
            continue
        yc = y.copy()
        yc.data = np.maximum(yc.data, 0.0)
        vals = np.asarray((yc @ sp.csc_matrix(full[:, take].astype(np.float64))).toarray())
        out[:, take] = vals
        best_cost[take] = cost[take]
    return out


def noisy_clipped_detailed(meas: pl.LazyFrame | pl.DataFrame, spec: HistogramSpec, n_units: int) -> sp.csr_matrix | None:
    """The identity query's noisy answers (one per cell) clipped at 0, CSR ``(n_units, n_cells)``;
    None if not measured."""
    meas = meas.lazy()
    if not spec.has_role("identity"):
        return None
    d = meas.filter(pl.col("query") == spec.role("identity")).collect()
    if d.height == 0:
        return None
    vals = np.maximum(d["value"].to_numpy().astype(np.float64), 0.0)
    x = sp.csr_matrix((vals, (d["unit"].to_numpy(), d["answer"].to_numpy())), shape=(n_units, spec.n_cells))
    x.eliminate_zeros()
    return x


_WLS_CACHE: dict[tuple, np.ndarray] = {}


def _wls_weights(spec: HistogramSpec, stats: Statistics, design: tuple[tuple[str, float], ...]) -> np.ndarray:
    """``H⁻¹ V`` ``(n_cells, n_stats)`` for a design ``((query, variance), ...)`` (cached: every
    trial of an experiment and often every level share the design)."""
    key = (spec.name, spec.n_cells, stats.names, design)
    if key not in _WLS_CACHE:
        if len(_WLS_CACHE) > 16:
            _WLS_CACHE.clear()
        _WLS_CACHE[key] = _solve_design(spec, stats, design)
    return _WLS_CACHE[key]


def _solve_design(spec: HistogramSpec, stats: Statistics, design: tuple[tuple[str, float], ...]) -> np.ndarray:
    h = normal_matrix({name: spec.query(name).cell_to_answer for name, _ in design},
                      {name: 1.0 / var for name, var in design})
    vd = stats.vectors.toarray()
    if spec.has_role("identity") and any(name == spec.role("identity") for name, _ in design):
        return np.linalg.solve(h, vd)                     # every cell measured: H is positive definite
    return np.linalg.pinv(h, hermitian=True) @ vd         # minimum-norm: some cells not identified


def wls_statistics(meas: pl.LazyFrame | pl.DataFrame, spec: HistogramSpec, stats: Statistics, n_units: int) -> np.ndarray:
    """Statistic values of the unconstrained per-unit WLS estimate: float64 ``(n_units, n_stats)``."""
    meas = meas.lazy()
    n_stats = stats.vectors.shape[1]
    design = meas.group_by("query").agg(pl.col("variance").first()).collect()
    if not design.height:
        return np.full((n_units, n_stats), np.nan)
    w = _wls_weights(spec, stats, tuple(sorted((str(q), float(v)) for q, v in design.iter_rows())))
    out = np.zeros((n_units, n_stats))
    for _, var, y, m in _per_query(meas, spec, n_units):  # one query's answers at a time
        out += np.asarray(y @ (m @ w)) / var
    return out
