"""Margins of error from the measurement design (pipeline.uncertainty)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.model.spec import load_spec
from pipeline.release.tables import load_tables
from pipeline.release.uncertainty import Z90, UncertaintyError, line_covariance, release_moe90, table_moe90

TS = load_tables("pl94")
SPEC = load_spec("pl94")
N_FREE = int((~SPEC.structural_zero_mask).sum())  # 1953 cells that can be non-zero


def test_detailed_only_gives_sum_of_cell_variances() -> None:
    moe = table_moe90(SPEC, {"detailed": 10.0}, TS.of_kind("persons"))
    # P1 total sums every free cell; White alone (P1 3) has 32 cells minus 2 structural zeros
    assert moe["P1"][0] == pytest.approx(Z90 * np.sqrt(10.0 * N_FREE))
    assert moe["P1"][2] == pytest.approx(Z90 * np.sqrt(10.0 * 30))
    assert moe["P2"][1] == pytest.approx(Z90 * np.sqrt(10.0 * 945))  # Hispanic: 1008 cells minus 63 zeros


def test_matches_brute_force_generalised_least_squares() -> None:
    """aᵀ(QᵀV⁻¹Q)⁻¹a against an explicit stacked-matrix computation."""
    v = {"total": 2.0, "hhgq": 3.0, "votingage*hispanic*cenrace": 5.0, "detailed": 11.0}
    keep = ~SPEC.structural_zero_mask
    q = np.vstack([SPEC.query(n).matrix().toarray()[:, keep] for n in v])
    w = np.concatenate([np.full(SPEC.query(n).n_answers, 1 / x) for n, x in v.items()])
    cov = np.linalg.inv(q.T @ (q * w[:, None]))
    a = np.vstack([t.matrix.toarray() for t in TS.of_kind("persons")])[:, keep].astype(float)
    want = np.einsum("ij,jk,ik->i", a, cov, a)
    got = line_covariance(SPEC, v, np.vstack([t.matrix.toarray() for t in TS.of_kind("persons")]))
    assert np.allclose(got, want, rtol=1e-8)


def test_invariant_total_has_zero_margin_and_shrinks_others() -> None:
    v = {"total": 2.0, "detailed": 10.0}
    free = table_moe90(SPEC, v, TS.of_kind("persons"))
    fixed = table_moe90(SPEC, v, TS.of_kind("persons"), exact=[np.ones(SPEC.n_cells)])
    assert fixed["P1"][0] == 0.0 and fixed["P2"][0] == 0.0 and free["P1"][0] > 0
    assert np.all(fixed["P1"][1:] <= free["P1"][1:] + 1e-12)
    # units: known total, 2 cells with variance 5 -> occupied has variance 5/2
    u = table_moe90(TS.specs["units"], {"detailed": 5.0}, TS.of_kind("units"), exact=[np.ones(2)])
    assert u["H1"][0] == 0.0 and u["H1"][1] == pytest.approx(Z90 * np.sqrt(2.5))


def test_lines_not_determined_by_the_measurements_are_nan() -> None:
    moe = table_moe90(SPEC, {"total": 2.0, "cenrace": 3.0}, TS.of_kind("persons"))
    assert np.isfinite(moe["P1"]).all()              # every P1 line is a function of cenrace
    assert np.isnan(moe["P2"][1]) and np.isnan(moe["P5"]).all()  # Hispanic, GQ types: not measured
    none = table_moe90(TS.specs["units"], {}, TS.of_kind("units"), exact=[np.ones(2)])
    assert none["H1"][0] == 0.0 and np.isnan(none["H1"][1:]).all()


def test_release_moe_per_table_and_level() -> None:
    variances = {"persons": {"nation": {"detailed": 4.0}, "block": {"detailed": 9.0, "total": 1.0}},
                 "units": {"block": {"detailed": 3.0}}}
    out = release_moe90({k: TS.of_kind(k) for k in ("persons", "units")}, TS.specs, variances,
                        ["nation", "block"], {"persons": ["nation"], "units": ["nation", "block"]})
    assert out[("P1", "nation")][0] == 0.0 and out[("P1", "block")][0] > 0
    assert out[("H1", "block")][0] == 0.0 and np.isnan(out[("H1", "nation")][1])


def test_bad_variance_is_refused() -> None:
    with pytest.raises(UncertaintyError):
        table_moe90(SPEC, {"detailed": 0.0}, TS.of_kind("persons"))


def test_margin_covers_the_real_discrete_gaussian_estimator() -> None:
    """Monte Carlo with the project's exact sampler at a small σ² (where N_Z's variance < σ²).

    Units at one block: housing units T known exactly, vacant/occupied measured with σ² = 1/4
    (N_Z(0, 1/4) has variance about 14% below σ²).
    The constrained least-squares estimate of occupied is (y_occ − y_vac + T)/2. Its empirical
    variance over 200,000 draws must match the formula (with the exact N_Z variance from
    ``variances_from_privacy``'s source) within 3%: the relative s.e. of a variance estimate
    from n draws is √((κ−1)/n) ≈ 0.38% (κ ≈ 3.9, the kurtosis of the noise difference), so 3% is
    ~8 s.e. (false-failure rate < 1e-14); using σ²
    instead of the exact variance would be off by 14% and fail.
    """
    from fractions import Fraction

    from pipeline.model.design import discrete_gaussian_variance
    from pipeline.privacy.randomness import seeded_source
    from pipeline.privacy.samplers import discrete_gaussian

    s2 = Fraction(1, 4)
    v = float(discrete_gaussian_variance(s2))
    n = 200_000
    noise = discrete_gaussian(s2, 2 * n, seeded_source(1234, "moe-test")).reshape(2, n)
    true_vac, true_occ = 3, 17
    y_vac, y_occ = true_vac + noise[0], true_occ + noise[1]
    est = (y_occ - y_vac + (true_vac + true_occ)) / 2
    moe = table_moe90(TS.specs["units"], {"detailed": v}, TS.of_kind("units"), exact=[np.ones(2)])["H1"]
    se = moe[1] / Z90
    assert np.var(est) == pytest.approx(se**2, rel=0.03)
    assert abs(v - float(s2)) / float(s2) > 0.1  # the exact variance really differs here
    # two-sided 90% interval: coverage of the integer-valued estimator is at least 90%
    assert np.mean(np.abs(est - true_occ) <= moe[1]) >= 0.9


def test_repeated_rows_index_like_the_array_they_stand_for() -> None:
    """The bottom level's margins held per parent index, slice and convert exactly as the
    ``(n_units, k)`` array ``values[rows]`` would."""
    from pipeline.release.uncertainty import RepeatedRows

    values = np.arange(12, dtype=np.float64).reshape(4, 3)
    rows = np.array([0, 0, 1, 3, 3, 3, 2])
    m, whole = RepeatedRows(values, rows), values[rows]
    assert m.shape == whole.shape and m.ndim == 2
    for key in (slice(2, 6), slice(None), 4, (slice(1, 5), 2), (slice(None), 0), (np.array([6, 0]), slice(0, 2))):
        assert np.array_equal(m[key], whole[key])
    assert np.array_equal(np.asarray(m), whole)


def test_margins_kept_in_files_read_as_the_arrays_they_stand_for(tmp_path: Path) -> None:
    """Margins written to files (the release writer's, ``release_margins(..., spill=)``) give
    back exactly the held array's rows for every range of units, empty and clipped ones too,
    and for per-parent rows only their parents' rows are read; anything but a range of units is
    refused rather than read whole."""
    from pipeline.release.uncertainty import DiskRows, RepeatedRows

    rng = np.random.default_rng(3)
    a = rng.normal(size=(23, 5))
    d = DiskRows.write(tmp_path / "a.f64", a)
    assert d.shape == a.shape and d.ndim == 2 and (tmp_path / "a.f64").stat().st_size == a.size * 8
    values, rows = rng.normal(size=(6, 5)), np.repeat(np.arange(6), [1, 4, 0, 7, 2, 9])
    r = RepeatedRows(DiskRows.write(tmp_path / "v.f64", values), rows)
    held = values[rows]
    for s, e in ((0, 23), (3, 9), (5, 5), (22, 40), (-4, None), (0, 1), (9, 3)):
        assert np.array_equal(d[s:e], a[s:e]), (s, e)
        assert np.array_equal(r[s:e], held[s:e]), (s, e)
    assert np.array_equal(np.asarray(d), a) and np.array_equal(np.asarray(r), held)
    for bad in (3, (slice(0, 2), 1), slice(0, 10, 2), np.array([1, 2])):
        with pytest.raises(TypeError):
            d[bad]
        if not isinstance(bad, slice):
            with pytest.raises(TypeError):
                r[bad]


def test_full_estimator_margins_fitted_in_parts_are_those_of_the_whole_tree() -> None:
    """The full estimator's line variances, fitted a part of the tree at a time, against the whole
    tree's GLS fitted at once (``fit``), with the unit's invariant total conditioned on at
    nation and state: nation -> 3 states -> counties -> tracts -> blocks, uneven. Equal to
    rounding (BLAS orders a matrix product's sums by how many rows it is given: a part's units
    are not bitwise the whole level's), bitwise with ``part_units=0`` (the whole tree, as releases
    made before the parts), and bitwise the same on every call with the same parts."""
    from test_postprocess_gls import fit

    from pipeline.postprocess import gls
    from pipeline.release.uncertainty import RepeatedRows, gls_line_variances

    rng = np.random.default_rng(7)
    levels = ["nation", "state", "county", "tract", "block"]
    n, ptrs = 1, []
    for fanout in (3, 3, 3, 4):
        c = rng.integers(1, fanout + 1, size=n)
        c[0] = fanout  # siblings at every level
        ptrs.append(np.concatenate([[0], np.cumsum(c)]).astype(np.int64))
        n = int(c.sum())
    var = {"nation": {"total": 1.0, "votingage*hispanic*cenrace": 8.0, "detailed": 40.0},
           "state": {"total": 2.0, "hhgq": 9.0, "detailed": 30.0},
           "county": {"votingage*hispanic*cenrace": 6.0, "detailed": 25.0},
           "tract": {"detailed": 20.0},
           "block": {"total": 5.0, "detailed": 12.0}}
    tabs = TS.of_kind("persons")[:3]
    exact = {"persons": ["nation", "state"]}
    sizes = [1] + [int(p[-1]) for p in ptrs]
    # the reference: one fit of the whole tree, each line's variance conditioned on the total
    whole = fit(SPEC, [gls.LevelMeasurements(None if i == 0 else ptrs[i - 1],
                                                 {q: (np.zeros((sizes[i], SPEC.query(q).n_answers)), v)
                                                  for q, v in var[lv].items()})
                           for i, lv in enumerate(levels)], means=False)
    ones = [np.ones(m) for m in SPEC.shape]
    for parts_of in (0, 10**9, 7, 2):  # the whole tree; one part; a few; about a part per two blocks
        got = gls_line_variances({"persons": tabs}, {"persons": SPEC}, {"persons": var}, ptrs, levels, exact,
                                 part_units=parts_of)
        assert isinstance(got[(tabs[0].name, "block")], RepeatedRows)
        for i, lv in enumerate(levels):
            fit = whole.levels[i]
            t_var = fit.covariances_of([ones], [ones])
            for t in tabs:
                ls = [uncertainty_line_factors(row) for row in t.matrix.toarray() > 0]
                want = fit.covariances_of(ls, ls)
                if lv in exact["persons"]:
                    c = fit.covariances_of(ls, [ones] * len(ls))
                    want = want - np.divide(c * c, t_var, out=np.zeros_like(want), where=t_var > 0)
                assert np.allclose(np.asarray(got[(t.name, lv)]), np.maximum(want, 0.0), rtol=1e-12, atol=0), \
                    (parts_of, t.name, lv)
                if parts_of == 0:  # as releases before the parts were made: what verify reproduces for them
                    assert np.array_equal(np.asarray(got[(t.name, lv)]), np.maximum(want, 0.0)), (t.name, lv)
        again = gls_line_variances({"persons": tabs}, {"persons": SPEC}, {"persons": var}, ptrs, levels, exact,
                                   part_units=parts_of)
        assert all(np.array_equal(np.asarray(again[key]), np.asarray(got[key])) for key in got)


def uncertainty_line_factors(mask: np.ndarray) -> list[np.ndarray]:
    from pipeline.release.uncertainty import line_factors
    return line_factors(SPEC, mask)
