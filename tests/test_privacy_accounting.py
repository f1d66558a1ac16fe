"""Accounting: strategy files, exact ρ arithmetic, ρ → ε reference values, PLD figures."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.model.strategy import StrategyError, load_strategy
from pipeline.privacy.accounting import cks_epsilon, loose_epsilon
from pipeline.privacy.pld import composed_dg_epsilon, strategy_pld_epsilon, strategy_shifts

PERSONS_RHO = Fraction(293764, 114921)
UNITS_RHO = Fraction(11417641, 152349649)


def test_persons_strategy_is_the_2020_production_table():
    s = load_strategy("census2020_pl94")
    assert s.rho == Fraction(542, 339) ** 2 == PERSONS_RHO
    assert s.level_names == ("nation", "state", "county", "tract", "block_group", "block")
    assert s.total_rho == PERSONS_RHO  # shares sum to exactly 1 everywhere
    assert "total" not in s.queries("nation") and "total" in s.queries("state")
    assert s.levels["tract"][0] == Fraction(687, 4099)
    assert s.levels["tract"][1]["hispanic*cenrace"] == Fraction(1933, 4102)
    assert s.levels["nation"][1]["detailed"] == Fraction(189, 241)
    rq = s.rho_by_level_query()
    assert len(rq) == 10 + 5 * 11
    assert sum(rq.values()) == PERSONS_RHO
    # σ for orientation (ARCHITECTURE §5): county total 2.17, tract total 2.47, BG total 1.75,
    # block detailed 3.18
    for (lv, q), want in {("county", "total"): 2.17, ("tract", "total"): 2.47,
                          ("block_group", "total"): 1.75, ("block", "detailed"): 3.18}.items():
        s2 = s.sigma2(lv, q)
        assert isinstance(s2, Fraction)
        assert s2 == 1 / (PERSONS_RHO * s.levels[lv][0] * s.levels[lv][1][q])
        assert math.sqrt(s2) == pytest.approx(want, abs=0.005)


def test_units_and_uniform_strategies():
    u = load_strategy("census2020_units")
    assert u.rho == UNITS_RHO == u.total_rho and u.spec == "units"
    assert all(u.queries(lv) == ("detailed",) for lv in u.level_names)
    assert u.levels["block_group"][0] == Fraction(1759, 4100)
    # per-level σ of the occupancy query in 2020: US 52.3, county 12.5, tract 6.13, BG 5.58, block 10.5
    for lv, want in {"nation": 52.3, "county": 12.5, "tract": 6.13, "block_group": 5.58, "block": 10.51}.items():
        assert math.sqrt(u.sigma2(lv, "detailed")) == pytest.approx(want, abs=0.01)
    assert load_strategy("uniform").total_rho == 1


def test_cks_reference_values():
    # certified 2020 figures: persons 17.14, units 2.47 at δ = 1e-10; loose bound 17.90
    e = cks_epsilon(PERSONS_RHO, "1e-10")
    assert Fraction(1714, 100) <= e < Fraction(1715, 100)
    assert e == Fraction(171436, 10000)  # 17.14355... rounded *up* to 1e-4
    assert cks_epsilon(UNITS_RHO, 1e-10) == Fraction(24747, 10000)
    assert loose_epsilon(PERSONS_RHO, 1e-10) == Fraction(179002, 10000)
    assert math.floor(loose_epsilon(PERSONS_RHO, 1e-10) * 100) / 100 == 17.90


def test_cks_is_never_below_the_true_bound():
    # the true CKS bound minimised over α with high precision: reported ε ≥ it, and within the grid
    import mpmath

    with mpmath.workdps(50):
        for rho in (PERSONS_RHO, UNITS_RHO, Fraction(1, 2), Fraction(1, 200)):
            r, ld = mpmath.mpf(rho.numerator) / rho.denominator, mpmath.log(mpmath.mpf(10) ** 10)
            f = lambda a: a * r + (ld + (a - 1) * mpmath.log(1 - 1 / a) - mpmath.log(a)) / (a - 1)
            a_star = mpmath.findroot(lambda a: mpmath.diff(f, a), 1 + 1 / mpmath.sqrt(r))
            true = f(a_star)
            rep = cks_epsilon(rho, "1e-10")
            assert mpmath.mpf(rep.numerator) / rep.denominator >= true
            assert float(rep) - float(true) <= 1e-4 + 1e-9


def test_cks_matches_opendp_figures_in_the_notes():
    # dp-libraries.md §4.3: OpenDP make_zCDP_to_approxDP gives 6.839 (ρ=0.5) and 0.604 (ρ=0.005)
    assert float(cks_epsilon(Fraction(1, 2), 1e-10)) == pytest.approx(6.839, abs=6e-4)
    assert float(cks_epsilon(Fraction(1, 200), 1e-10)) == pytest.approx(0.604, abs=6e-4)


def test_pld_single_mechanism_and_strategy():
    # dp_accounting PLD for one discrete Gaussian (notes §4.3): 6.484 (σ=1), 0.574 (σ=10)
    e1 = composed_dg_epsilon({Fraction(1): 1}, 1e-10)
    e10 = composed_dg_epsilon({Fraction(100): 1}, 1e-10)
    assert 6.484 <= float(e1) <= 6.50
    assert 0.574 <= float(e10) <= 0.58
    s = load_strategy("census2020_pl94")
    shifts = strategy_shifts(s)
    assert sum(shifts.values()) == 2 * 65
    assert sum(Fraction(c, 2) / s2 for s2, c in shifts.items()) == PERSONS_RHO
    e = strategy_pld_epsilon(s, 1e-10)
    assert 16.0 < float(e) < float(cks_epsilon(PERSONS_RHO, 1e-10))  # tighter than via ρ


@pytest.mark.parametrize("body, message", [
    ("name: x\nspec: pl94\nrho: 0\nlevels: {nation: {share: 1, queries: {total: 1}}}", "rho must be > 0"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {nation: {share: 1/2, queries: {total: 1}}}", "level shares sum to 1/2"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {nation: {share: 1, queries: {total: 1/3, detailed: 1/3}}}",
     "query shares sum to 2/3"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {nation: {share: 1, queries: {bogus: 1}}}", "query 'bogus' is not in spec"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {planet: {share: 1, queries: {total: 1}}}", "unknown geolevel"),
    ("name: x\nspec: pl94\nrho: 0.5\nlevels: {nation: {share: 1, queries: {total: 1}}}", "not the float"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {nation: {share: 1, queries: {total: 1/0}}}", "not an exact fraction"),
    ("name: x\nspec: nosuchspec\nrho: 1\nlevels: {nation: {share: 1, queries: {total: 1}}}", "cannot load spec"),
    ("name: x\nspec: pl94\nrho: 1\nlevels: {state: {share: 1/2, queries: {total: 1}}, "
     "nation: {share: 1/2, queries: {total: 1}}}", "top to bottom"),
    ("name: x\nrho: 1\nlevels: {}", "missing key(s): spec"),
    ("name: x\nspec: units\nrho: 1\nlevels: {nation: {share: 1, queries: {cenrace: 1}}}", "not in spec 'h1'"),
])
def test_strategy_validation_errors(tmp_path: Path, body: str, message: str):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(StrategyError) as err:
        load_strategy(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)


def test_missing_strategy_file():
    with pytest.raises(StrategyError, match="not found"):
        load_strategy("no_such_strategy")


def test_unknown_level_or_query_lookup():
    s = load_strategy("census2020_pl94")
    with pytest.raises(StrategyError, match="does not measure query 'total' at level 'nation'"):
        s.sigma2("nation", "total")
    with pytest.raises(StrategyError, match="no level 'planet'"):
        s.queries("planet")


@pytest.mark.slow
def test_pld_not_below_dp_accounting():
    """Cross-check with Google's dp_accounting (test-only extra ``accounting-check``)."""
    pld = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")
    for name in ("census2020_pl94", "census2020_units"):
        shifts = strategy_shifts(load_strategy(name))
        total = None
        for s2, c in sorted(shifts.items()):
            m = pld.from_discrete_gaussian_mechanism(math.sqrt(s2), sensitivity=1,
                                                     value_discretization_interval=1e-4)
            m = m.self_compose(c)
            total = m if total is None else total.compose(m)
        theirs = total.get_epsilon_for_delta(1e-10)
        ours = float(strategy_pld_epsilon(load_strategy(name), 1e-10))
        assert ours >= theirs, (name, ours, theirs)
        assert ours - theirs < 0.1, (name, ours, theirs)


def test_cli_budget_prints_the_table_and_both_epsilons():
    from typer.testing import CliRunner

    from dptab.cli import app

    res = CliRunner().invoke(app, ["budget", "schemas/strategies/census2020_pl94.yaml", "--delta", "1e-10"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "17.1436 (≈ 17.14)" in out and "17.9002" in out and "PLD" in out and "16.4807" in out
    assert "293764/114921" in out
    assert "block_group" in out and "hispanic*cenrace" in out and "3.177" in out  # block detailed σ
    bad = CliRunner().invoke(app, ["budget", "no_such_strategy", "--no-pld"])
    assert bad.exit_code == 2 and "not found" in bad.output
    units = CliRunner().invoke(app, ["budget", "census2020_units", "--no-pld"])
    assert units.exit_code == 0 and "2.4747" in units.output and "PLD" not in units.output


def _exact_dg_epsilon(sigma2: Fraction, copies: int, delta: float) -> float:
    """ε(δ) of ``copies`` unit shifts of N_Z(0, σ²), by direct convolution on the exact lattice
    (losses (copies − 2 Σx)/(2σ²) need no rounding) and bisection."""
    import numpy as np

    s2 = float(sigma2)
    k = int(14 * math.sqrt(s2)) + 5
    x = np.arange(-k, k + 1)
    p = np.exp(-(x * x) / (2 * s2))
    p /= p.sum()
    dist = np.array([1.0])
    for _ in range(copies):
        dist = np.convolve(dist, p)
    sums = np.arange(-copies * k, copies * k + 1)
    loss = (copies - 2 * sums) / (2 * s2)

    def delta_at(eps: float) -> float:
        sel = loss > eps
        return float(np.sum(dist[sel] * -np.expm1(eps - loss[sel])))

    lo, hi = 0.0, 50.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if delta_at(mid) <= delta else (mid, hi)
    return hi


@pytest.mark.parametrize("sigma2, copies", [(Fraction(1), 1), (Fraction(7, 3), 4), (Fraction(100), 2),
                                            (Fraction(1, 2), 3)])
def test_pld_is_a_tight_upper_bound_of_the_exact_value(sigma2: Fraction, copies: int):
    exact = _exact_dg_epsilon(sigma2, copies, 1e-10)
    ours = float(composed_dg_epsilon({sigma2: copies}, 1e-10))
    assert exact <= ours <= exact + copies * 1e-3 + 1e-4  # pessimism: at most one grid step per shift
    coarse = float(composed_dg_epsilon({sigma2: copies}, 1e-10, grid=1e-2))
    assert coarse >= ours - 1e-4  # a coarser (more pessimistic) grid never gives less
