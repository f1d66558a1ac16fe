"""Measurement strategies as data: ρ per (level, query) as exact fractions.

A strategy YAML names a spec, a global ρ and per-level / per-query shares; see
``pipeline/schemas/strategies``. ``σ²_q = 1/ρ_q`` (squared L2 sensitivity 2 of a marginal under
bounded neighbours; see :mod:`pipeline.privacy.accounting`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigurationError
from pipeline.model.schemas import SCHEMAS_DIR, load_yaml, relative_to

STRATEGIES_DIR = SCHEMAS_DIR / "strategies"


class StrategyError(ConfigurationError):
    """A strategy file is malformed or inconsistent (exit status 2)."""


def parse_fraction(value: Any, what: str) -> Fraction:
    """Parse an exact rational from YAML (``"104/4099"``, ``3``, ``"0.25"``); floats are refused.

    A YAML float such as ``0.1`` is not exact, so it is rejected with a message naming ``what``.
    """
    if isinstance(value, bool) or value is None:
        raise StrategyError(f"{what}: expected an exact fraction like '104/4099', got {value!r}")
    if isinstance(value, float):
        raise StrategyError(f"{what}: write the fraction exactly as text (e.g. '1/10'), not the float {value!r}")
    try:
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError) as exc:
        raise StrategyError(f"{what}: not an exact fraction: {value!r} ({exc})") from None


def _declared_levels(declared: object) -> tuple[str, ...] | str | None:
    if isinstance(declared, list):
        return tuple(str(n) for n in declared)
    return str(declared) if declared else None


def _level_names(declared: object = None) -> tuple[str, ...]:
    """The level names a strategy may measure: its own ``geolevels`` (a list of names, top to
    bottom, for a lookup-file hierarchy, or a geolevels YAML name), default ``schemas/geolevels.yaml``."""
    from pipeline.model.geography import load_geolevels

    if isinstance(declared, list):
        return tuple(str(n) for n in declared)
    return tuple(lv.name for lv in load_geolevels(str(declared) if declared else "geolevels"))


@dataclass(frozen=True)
class Strategy:
    """A measurement strategy: global ρ, level shares and per-level query shares (all exact).

    ``levels`` maps a geolevel name to ``(level share, {query name: query share})``; levels and
    queries keep the YAML order.
    """

    name: str
    spec: str
    rho: Fraction
    levels: dict[str, tuple[Fraction, dict[str, Fraction]]]
    source: Path | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)
    #: levels whose units are solved in two passes, the spec's ``total`` query alone first
    #: (the 2020 ordering for state, county, tract and block-group children)
    multipass_levels: tuple[str, ...] = ()
    #: ``spec`` resolved: a shipped spec's name, or a spec file's path (relative to the strategy file)
    spec_path: str = field(default="", compare=False)
    #: the ``geolevels`` the file declares (level names of a lookup geography, or a geolevels
    #: YAML name); None: ``schemas/geolevels.yaml``
    geolevels: tuple[str, ...] | str | None = field(default=None, compare=False)

    @property
    def total_rho(self) -> Fraction:
        """Sum of ρ_q over every (level, query): equals ``rho`` exactly once validated."""
        return sum(self.rho_by_level_query().values(), Fraction(0))

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(self.levels)

    def queries(self, level: str) -> tuple[str, ...]:
        """Names of the queries measured at ``level`` (YAML order)."""
        return tuple(self._level(level)[1])

    def level_rho(self, level: str) -> Fraction:
        """ρ spent at one level (global ρ × level share)."""
        return self.rho * self._level(level)[0]

    def rho_q(self, level: str, query: str) -> Fraction:
        """ρ of one query at one level."""
        share, queries = self._level(level)
        if query not in queries:
            raise StrategyError(f"strategy {self.name!r} does not measure query {query!r} at level {level!r}")
        return self.rho * share * queries[query]

    def rho_by_level_query(self) -> dict[tuple[str, str], Fraction]:
        """``{(level, query): ρ_q}`` for every measured query."""
        return {(lv, q): self.rho * share * qs for lv, (share, queries) in self.levels.items()
                for q, qs in queries.items()}

    def sigma2(self, level: str, query: str) -> Fraction:
        """Exact discrete-Gaussian σ² = 1/ρ_q for one query (per answer, in counts²)."""
        return 1 / self.rho_q(level, query)

    def _level(self, level: str) -> tuple[Fraction, dict[str, Fraction]]:
        try:
            return self.levels[level]
        except KeyError:
            raise StrategyError(
                f"strategy {self.name!r} has no level {level!r}; levels: {', '.join(self.levels)}"
            ) from None


def budget_rows(strategy: Strategy) -> list[dict[str, Any]]:
    """One row per (level, query): exact ρ_q, σ² and σ (float), and the share of the total ρ."""
    total = strategy.total_rho
    return [{"level": lv, "query": q, "rho": r, "sigma2": 1 / r, "sigma": math.sqrt(1 / r),
             "share": r / total} for (lv, q), r in strategy.rho_by_level_query().items()]


def strategy_path(path_or_name: str | Path) -> Path:
    """Resolve a strategy file path, or a bare name in ``schemas/strategies/``."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml"):
        return p
    return STRATEGIES_DIR / f"{path_or_name}.yaml"


def load_strategy(path_or_name: str | Path) -> Strategy:
    """Load and validate a strategy YAML file (or a name in ``schemas/strategies/``).

    Keys: ``name``, ``spec``, ``rho``, ``levels`` (``{level: {share, queries: {query: share}}}``)
    and optionally ``multipass`` (levels solved total-first), ``description``.

    Checks (each failure raises :class:`StrategyError` naming the file and the item): ρ > 0;
    level names are geolevel names; every share > 0; level shares sum to exactly 1; the query
    shares of each level sum to exactly 1; every query exists in the strategy's histogram spec.
    """
    from pipeline.model.spec import SpecError, load_spec

    p = strategy_path(path_or_name)
    raw = load_yaml(p, StrategyError, "strategy")
    if not isinstance(raw, dict):
        raise StrategyError(f"{p}: expected a mapping with keys name, spec, rho, levels")
    missing = [k for k in ("name", "spec", "rho", "levels") if k not in raw]
    if missing:
        raise StrategyError(f"{p}: missing key(s): {', '.join(missing)}")
    rho = parse_fraction(raw["rho"], f"{p}: rho")
    if rho <= 0:
        raise StrategyError(f"{p}: rho must be > 0, got {rho}")
    spec_path = relative_to(str(raw["spec"]), p.resolve().parent)  # a spec file named relative to the strategy
    try:
        spec = load_spec(spec_path)
    except (SpecError, OSError) as exc:
        raise StrategyError(f"{p}: cannot load spec {raw['spec']!r}: {exc}") from None
    known_levels = _level_names(raw.get("geolevels"))
    if not isinstance(raw["levels"], dict) or not raw["levels"]:
        raise StrategyError(f"{p}: levels must be a non-empty mapping of geolevel name -> share, queries")
    levels: dict[str, tuple[Fraction, dict[str, Fraction]]] = {}
    for lv, body in raw["levels"].items():
        where = f"{p}: level {lv!r}"
        if lv not in known_levels:
            raise StrategyError(f"{where}: unknown geolevel; known: {', '.join(known_levels)}")
        if not isinstance(body, dict) or "share" not in body or "queries" not in body:
            raise StrategyError(f"{where}: needs 'share' and 'queries'")
        share = parse_fraction(body["share"], f"{where} share")
        if share <= 0:
            raise StrategyError(f"{where}: share must be > 0 (omit the level instead), got {share}")
        if not isinstance(body["queries"], dict) or not body["queries"]:
            raise StrategyError(f"{where}: queries must be a non-empty mapping query -> share")
        queries: dict[str, Fraction] = {}
        for q, qs in body["queries"].items():
            if q not in spec.query_defs:
                raise StrategyError(
                    f"{where}: query {q!r} is not in spec {spec.name!r}; known: {', '.join(spec.query_defs)}"
                )
            f = parse_fraction(qs, f"{where} query {q!r}")
            if f <= 0:
                raise StrategyError(f"{where} query {q!r}: share must be > 0 (omit the query instead), got {f}")
            queries[str(q)] = f
        total = sum(queries.values(), Fraction(0))
        if total != 1:
            raise StrategyError(f"{where}: query shares sum to {total} (= {float(total):.6f}), not exactly 1")
        levels[str(lv)] = (share, queries)
    total = sum((s for s, _ in levels.values()), Fraction(0))
    if total != 1:
        raise StrategyError(f"{p}: level shares sum to {total} (= {float(total):.6f}), not exactly 1")
    order = [lv for lv in known_levels if lv in levels]
    if list(levels) != order:
        raise StrategyError(f"{p}: levels must be listed top to bottom: {', '.join(order)}")
    multipass = tuple(str(lv) for lv in (raw.get("multipass") or ()))
    unknown = [lv for lv in multipass if lv not in levels]
    if unknown:
        raise StrategyError(f"{p}: multipass levels {unknown} are not levels of this strategy")
    if multipass and not spec.has_role("total"):
        raise StrategyError(f"{p}: multipass needs a spec whose queries include a 'total' role")
    return Strategy(name=str(raw["name"]), spec=str(raw["spec"]), rho=rho, levels=levels,
                    source=p, description=str(raw.get("description", "")), multipass_levels=multipass,
                    spec_path=spec_path, geolevels=_declared_levels(raw.get("geolevels")))




def respend_invariant_rho(strategy: Strategy, exact: dict[str, tuple[str, ...]], name: str | None = None) -> Strategy:
    """The same strategy with the ρ of every measurement that invariants determine exactly
    re-spent on all its other measurements, in proportion to their ρ (the same total ρ, so the
    same ε; every other query's σ² shrinks by the same factor ``1 − freed / ρ``).

    ``exact[level]``: queries whose answers the declared invariants fix at ``level`` (e.g. the
    persons ``total`` at state level when state totals are invariant: the 2020 strategy spends
    3773/4097 of its state-level ρ — 32% of the persons ρ — on a count that is then published
    exactly, so those draws inform nothing). A level left with no query is dropped. Exact
    fractions throughout; raises :class:`StrategyError` if nothing would be left.
    """
    rho_q = {k: r for k, r in strategy.rho_by_level_query().items() if k[1] not in exact.get(k[0], ())}
    freed = strategy.total_rho - sum(rho_q.values(), Fraction(0))
    if not rho_q:
        raise StrategyError(f"strategy {strategy.name!r}: every measurement is determined by invariants")
    scale = strategy.total_rho / (strategy.total_rho - freed)
    levels: dict[str, tuple[Fraction, dict[str, Fraction]]] = {}
    for lv in strategy.levels:
        qs = {q: r * scale for (lv2, q), r in rho_q.items() if lv2 == lv}
        if not qs:
            continue
        level_rho = sum(qs.values(), Fraction(0))
        levels[lv] = (level_rho / strategy.rho, {q: r / level_rho for q, r in qs.items()})
    dropped = [f"{lv}:{q}" for lv, qs in exact.items() for q in qs if (lv, q) in strategy.rho_by_level_query()]
    return Strategy(name=name or f"{strategy.name}_respent", spec=strategy.spec, rho=strategy.rho, levels=levels,
                    source=None,
                    description=(f"{strategy.name} with the rho of the measurements the invariants fix exactly "
                                 f"({', '.join(dropped) or 'none'}: {freed} of {strategy.total_rho}) re-spent on every "
                                 f"other measurement in proportion (x{scale})"),
                    multipass_levels=tuple(lv for lv in strategy.multipass_levels if lv in levels),
                    spec_path=strategy.spec_path, geolevels=strategy.geolevels)


def strategy_yaml(strategy: Strategy, header: str = "") -> str:
    """A strategy as the YAML text :func:`load_strategy` reads (exact fractions as text)."""
    import yaml

    def frac(x: Fraction) -> str:
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"

    body: dict[str, Any] = {"name": strategy.name, "description": strategy.description, "spec": strategy.spec,
                            "rho": frac(strategy.rho)}
    if strategy.geolevels is not None:
        body["geolevels"] = list(strategy.geolevels) if isinstance(strategy.geolevels, tuple) else strategy.geolevels
    if strategy.multipass_levels:
        body["multipass"] = list(strategy.multipass_levels)
    body["levels"] = {lv: {"share": frac(s), "queries": {q: frac(x) for q, x in qs.items()}}
                      for lv, (s, qs) in strategy.levels.items()}
    text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
