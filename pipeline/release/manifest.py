"""The release's manifest: what it says about the release, and the parts of it both the
writer and ``dptab verify`` compute — the privacy section from the strategies (and the
strategy copies the release carries), the margins of error from the design, the release
metadata, the format constants and the release's errors."""

from __future__ import annotations

import datetime as _dt
import re
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.release.checks import CheckFailure

if TYPE_CHECKING:
    pass
from pipeline.errors import DptabError, RefusedError
from pipeline.model.design import design_from_rho
from pipeline.model.schemas import SCHEMAS_DIR, parse_yaml, relative_to
from pipeline.release.tables import (
    TableSet,
)
from pipeline.release.uncertainty import MARGIN_PART_UNITS, Z90, DiskRows, RepeatedRows, gls_line_variances, release_moe90

MANIFEST_SCHEMA = SCHEMAS_DIR / "manifest.schema.json"
MANIFEST_FORMAT = "dptab-release/3"
#: ``randomness`` values of a manifest (``unseeded``: not seeded, mode not recorded by the caller)
RANDOMNESS_MODES = ("secure", "keyed", "seeded", "unseeded")
#: rows of the long tables written per chunk (bounds memory at block level)
CHUNK_UNITS = 50_000


class ReleaseError(DptabError, RuntimeError):
    """The release could not be written; nothing was published."""


class ReleaseExistsError(ReleaseError, RefusedError, FileExistsError):
    """A release with this id already exists; releases are never overwritten (CLI exit status 2)."""


class ReleaseCheckError(ReleaseError):
    """A consistency check failed on the release being written; ``failures`` lists them."""

    def __init__(self, failures: Sequence[CheckFailure]) -> None:
        self.failures = list(failures)
        head = "\n".join(f"  {f}" for f in self.failures[:20])
        super().__init__(f"{len(self.failures)} consistency check failure(s); nothing was published:\n{head}")


@dataclass(frozen=True)
class ReleaseMetadata:
    """Who and what made a release (all public). ``created`` defaults to now (UTC, ISO 8601)."""

    release_id: str
    dataset_id: str
    software_version: str
    config_hash: str
    git_commit: str | None = None
    seed: int | None = None
    title: str = "dptab release"
    citation: str | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    #: the run's ``privacy.randomness`` (``secure``, ``keyed`` or ``seeded``); ``None``: the caller
    #: did not say, recorded as ``seeded`` when a seed is given and ``unseeded`` otherwise
    randomness: str | None = None
    #: persons were held to the published housing units (``joint.households``)
    joint_households: bool = False
    #: the engine relaxed some persons bound (a counted fallback), so the joint rules may break there
    joint_relaxed: bool = False
    #: ``postprocess.estimator``: ``topdown`` (2020) or ``full`` (hierarchical GLS, then the engine)
    estimator: str = "topdown"

    def randomness_mode(self) -> str:
        """The manifest's ``randomness``; raises :class:`ReleaseError` if it contradicts ``seed``."""
        mode = self.randomness or ("seeded" if self.seed is not None else "unseeded")
        if mode not in RANDOMNESS_MODES:
            raise ReleaseError(f"randomness {mode!r} is not one of {', '.join(RANDOMNESS_MODES)}")
        if (mode == "seeded") != (self.seed is not None):
            raise ReleaseError(f"randomness {mode!r} with seed {self.seed!r}: a seed is recorded iff randomness is seeded")
        return mode


#: what the manifest says of each estimator
ESTIMATORS = {
    "topdown": "2020 TopDown: each level post-processed from its own noisy measurements and its parent's "
               "published counts (non-negative, consistent, integer)",
    "full": "full-information: the hierarchical generalised least-squares (best linear unbiased) estimate from "
            "every level's noisy measurements, then the same constrained top-down post-processing "
            "(non-negative, consistent, integer)",
}


def _frac(x: Any) -> str:
    f = Fraction(x)
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)


class PrivacySection(dict):
    """The manifest's ``privacy`` section (a plain ``dict`` once written) that also remembers the
    strategy file each run kind was loaded from (``sources[kind]``: a path, or ``None`` for a
    strategy built in code), so :func:`write_release` can copy those files into the release."""

    sources: dict[str, Path | None]


def _strategy_key(kind: str, s: Any) -> tuple:
    """Everything of a Strategy the privacy section depends on, hashable (for the cache)."""
    return (kind, s.name, s.spec, s.rho,
            tuple((lv, share, tuple(qs.items())) for lv, (share, qs) in s.levels.items()))


#: privacy sections already computed, keyed by (strategy keys, delta text): the PLD accounting
#: takes ~1.5 s, and the writer, its self-check and ``dptab verify`` each recompute the section
_PRIVACY_CACHE: dict[tuple, dict[str, Any]] = {}


def privacy_parameters(strategies: Mapping[str, Any], delta: float | str = "1e-10") -> PrivacySection:
    """The manifest's ``privacy`` section from ``pipeline.model.strategy.Strategy`` objects.

    ``strategies`` maps a run kind (``persons``, ``units``) to its Strategy. ρ values are exact
    fraction strings; ε is the CKS 2020 bound (and the loose textbook bound) at ``delta``,
    rounded up, for each run and for their composition (ρ adds up under zCDP); ``pld`` is the
    tighter ε from the privacy-loss distribution of the composed discrete Gaussians actually
    used (``pipeline.privacy.pld``, also rounded up). Each run names its strategy and the copy
    of the strategy file the release carries (``strategy_file``: ``privacy/<kind>.yaml``), from
    which ``dptab verify`` recomputes this whole section.
    """
    import copy

    key = (tuple(_strategy_key(k, s) for k, s in strategies.items()), str(delta))
    if key not in _PRIVACY_CACHE:
        if len(_PRIVACY_CACHE) > 64:
            _PRIVACY_CACHE.clear()
        _PRIVACY_CACHE[key] = _privacy_section(strategies, delta)
    out = PrivacySection(copy.deepcopy(_PRIVACY_CACHE[key]))
    out.sources = {kind: s.source for kind, s in strategies.items()}
    return out


def _privacy_section(strategies: Mapping[str, Any], delta: float | str) -> dict[str, Any]:
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.privacy.accounting import cks_epsilon, loose_epsilon
    from pipeline.privacy.pld import composed_dg_epsilon, strategy_shifts

    # the PLD ε of every run and of their composition, side by side: each is FFTs over a long
    # grid (~0.45 s for the 2020 persons strategy), which numpy runs without the GIL
    every = [strategy_shifts(s) for s in strategies.values()]
    every.append(sum(every, Counter()))
    with ThreadPoolExecutor(min(len(every), 3), thread_name_prefix="dptab-pld") as pool:
        pld = list(pool.map(lambda sh: composed_dg_epsilon(sh, delta), every))
    runs, total = {}, Fraction(0)
    for i, (kind, s) in enumerate(strategies.items()):
        by: dict[str, dict[str, str]] = {}
        for (lv, q), r in s.rho_by_level_query().items():
            by.setdefault(lv, {})[q] = _frac(r)
        rho = s.total_rho
        total += rho
        # a spec file's name (the release carries it beside the strategy copy), or a shipped spec's name
        spec_ref = Path(s.spec).name if Path(s.spec).suffix in (".yaml", ".yml") else s.spec
        runs[kind] = {"strategy": s.name, "strategy_file": strategy_file(kind), "spec": spec_ref, "rho": _frac(rho),
                      "epsilon": {"cks2020": _frac(cks_epsilon(rho, delta)), "loose": _frac(loose_epsilon(rho, delta)),
                                  "pld": _frac(pld[i])},
                      "rho_by_level_query": by}
    return {
        "definition": "zero-concentrated differential privacy (rho-zCDP), converted to (epsilon, delta)-DP",
        "neighbouring": "bounded: datasets differing in one person's record",
        "mechanism": "exact discrete Gaussian noise, sigma^2 = 1/rho per query",
        "delta": str(delta),
        "rho": _frac(total),
        "epsilon": {"cks2020": _frac(cks_epsilon(total, delta)), "loose": _frac(loose_epsilon(total, delta)),
                    "pld": _frac(pld[-1])},
        "runs": runs,
    }


def strategy_file(kind: str) -> str:
    """Where a release keeps the copy of a run kind's strategy YAML (relative path)."""
    return f"privacy/{kind}.yaml"


def strategy_spec_files(privacy: Mapping[str, Any]) -> list[str]:
    """The copies of users' spec files the strategies name (``privacy/<file name>``; shipped
    specs, named without a suffix, are not copied)."""
    return [f"privacy/{run['spec']}" for run in privacy["runs"].values()
            if Path(str(run["spec"])).suffix in (".yaml", ".yml")]


def _copy_strategies(root: Path, privacy: Mapping[str, Any]) -> dict[str, Any]:
    """Copy every run's strategy YAML to ``root/privacy/<kind>.yaml`` and recompute the privacy
    section from the copies; returns it. Raises :class:`ReleaseError` when the given ``privacy``
    does not follow from those files (nothing is published then)."""
    from pipeline.model.strategy import StrategyError, load_strategy, strategy_path

    sources = getattr(privacy, "sources", {}) or {}
    loaded = {}
    for kind, run in privacy["runs"].items():
        src = sources.get(kind) or strategy_path(run["strategy"])
        if not Path(src).is_file():
            raise ReleaseError(f"strategy file of the {kind} run ({run['strategy']!r}) not found at {src}; "
                               "a release carries the strategies its privacy section is computed from")
        dst = root / strategy_file(kind)
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = Path(src).read_text()
        ref = str((parse_yaml(text) or {}).get("spec", ""))
        if Path(ref).suffix in (".yaml", ".yml"):
            # a spec file of the user's (not a shipped name): the release carries it beside the
            # strategy copy (privacy/<file name>), which then names it by its file name
            spec_copy = root / "privacy" / Path(ref).name
            if spec_copy.exists() or spec_copy == dst:
                raise ReleaseError(f"{src}: spec file {ref!r} would overwrite {spec_copy.relative_to(root)} in the release")
            shutil.copyfile(relative_to(ref, Path(src).resolve().parent), spec_copy)
            dst.write_text(re.sub(r"(?m)^spec:.*$", f"spec: {spec_copy.name}", text, count=1))
        else:
            shutil.copyfile(src, dst)
        try:
            loaded[kind] = load_strategy(dst)
        except StrategyError as exc:
            raise ReleaseError(f"strategy file {src} of the {kind} run: {exc}") from None
    recomputed = dict(privacy_parameters(loaded, privacy["delta"]))
    if recomputed != dict(privacy):
        raise ReleaseError("the privacy section does not follow from the strategy files "
                           f"{', '.join(str(sources.get(k) or strategy_path(r['strategy'])) for k, r in privacy['runs'].items())}"
                           f" at delta {privacy['delta']}; refusing to publish it")
    return recomputed


def release_margins(ts: TableSet, variances: Mapping[str, Mapping[str, Mapping[str, float]]], levels: Sequence[str],
                    digits: Mapping[str, int], state_totals: bool, block_housing_units: bool,
                    estimator: str = "topdown", child_ptrs: Sequence[np.ndarray] | None = None,
                    part_units: int | None = None, spill: Path | None = None
                    ) -> dict[tuple[str, str], np.ndarray | RepeatedRows | DiskRows]:
    """The published ``moe90`` of every (table, level) (before rounding): ``topdown``: float
    ``(n_lines,)``, the same for every unit of the level (the level's own measurements);
    ``full``: float ``(n_units, n_lines)``, per unit from the full estimator's exact GLS
    variances (``child_ptrs``: the geography's CSR child pointers, level by level); the bottom
    level's, the same for the units of one parent, as :class:`RepeatedRows` (``m[s:e]`` makes
    units ``s:e``'s); ``part_units``: how the tree is cut to fit them (``gls_line_variances``;
    default ``MARGIN_PART_UNITS``, the manifest's ``estimator.margin_part_units``).

    ``variances[kind][level][query]``: exact noise variances (counts²); the persons total is
    exact at levels of at most 2 GEOID digits when state totals are declared, the units total at
    every level when block housing units are. The writer and ``dptab verify`` both call this,
    so a verified margin is bitwise the one the writer computed. Results are memoised on every
    input (a digest of the tables' line matrices and the specs' queries, the variances, levels,
    flags and tree): the same inputs give the same floats, and a second caller in the process
    costs no second computation. The arrays are the memoised ones, read-only (not copied).

    ``spill`` (a directory; the release writer's): the full estimator's per-unit margins are
    written there, one file per (table, level), and returned as :class:`DiskRows` (the bottom
    level's per-parent rows as the ``values`` of its :class:`RepeatedRows`), read a range of
    units at a time; they are not memoised then (the point is not to hold them).
    """
    import hashlib

    # the declared totals: nation and state (GEOIDs of at most 2 digits), or the top level of a
    # lookup geography (digits -1), whose total is the one declared
    exact_totals = {"persons": [lv for lv in levels if state_totals and (0 <= digits[lv] <= 2 or lv == levels[0])],
                    "units": list(levels) if block_housing_units else []}
    by_kind = {k: ts.of_kind(k) for k in ("persons", "units")}
    # one query order whatever order the variances come in (the run's strategy order, or the
    # sorted keys of manifest.json): float sums depend on it, and the margins must be bitwise equal
    variances = {kind: {lv: {q: qs[q] for q in sorted(qs, key=_spec_order(ts.specs.get(kind)))}
                        for lv, qs in by.items()} for kind, by in variances.items()}
    tree = hashlib.sha256()
    for p in child_ptrs or ():
        tree.update(np.ascontiguousarray(p, dtype=np.int64).tobytes() + b"|")
    key = (_design_digest(ts, by_kind),
           tuple(sorted((k, lv, q, float(v)) for k, by in variances.items() for lv, qs in by.items()
                        for q, v in qs.items())),
           tuple(levels), tuple(exact_totals["persons"]), tuple(exact_totals["units"]), estimator,
           tree.hexdigest() if estimator == "full" else "",
           (MARGIN_PART_UNITS if part_units is None else part_units) if estimator == "full" else None)
    margins = _MARGINS_CACHE.get(key)
    if margins is None:
        if estimator == "full":
            if child_ptrs is None:
                raise ReleaseError("margins of error of the full estimator need the geography's tree")
            margins = gls_line_variances(by_kind, ts.specs, variances, child_ptrs, levels, exact_totals, part_units)
            for v in margins.values():  # in place (a block level's are per parent: RepeatedRows)
                a = v.values if isinstance(v, RepeatedRows) else v
                np.sqrt(a, out=a)
                a *= Z90
        else:
            margins = release_moe90(by_kind, ts.specs, variances, levels, exact_totals)
        for v in margins.values():
            # shared by every caller: nobody may change a cached margin
            for a in ((v.values, v.rows) if isinstance(v, RepeatedRows) else (v,)):
                a.flags.writeable = False
        if spill is None or estimator != "full":
            if len(_MARGINS_CACHE) > 16:
                _MARGINS_CACHE.clear()
            _MARGINS_CACHE[key] = margins
    if spill is None or estimator != "full":
        return dict(margins)
    return {(t, lv): _spilled(Path(spill) / f"{t}.{lv}.f64", v) for (t, lv), v in margins.items()}


def _spilled(path: Path, v: np.ndarray | RepeatedRows) -> DiskRows | RepeatedRows:
    """``v`` written to ``path``: a per-unit array as :class:`DiskRows`, a :class:`RepeatedRows`
    with its distinct rows there (its unit-to-row index stays in memory, 8 bytes a unit)."""
    if isinstance(v, RepeatedRows):
        return RepeatedRows(DiskRows.write(path, np.asarray(v.values)), v.rows)
    return DiskRows.write(path, v)


def child_ptrs_from_geoids(geoids: Sequence[Any], digits: Sequence[int]) -> list[np.ndarray]:
    """The CSR child pointers of a GEOID hierarchy: for each level ``i`` but the last, int64
    ``(n_i + 1,)`` such that level ``i + 1``'s units ``ptr[j]:ptr[j + 1]`` are unit ``j``'s
    children. ``geoids[i]``: the sorted GEOIDs of level ``i`` (numpy strings; the last level
    may be :class:`pipeline.release.tree.CodedGeoids`); ``digits[i]``: their length. A child's
    parent is the unit whose GEOID is its first ``digits[i]`` characters — for coded children, its
    code without the last ``digits[i + 1] - digits[i]`` digits, among the parents that are GEOIDs."""
    from pipeline.model.geography import parse_geoids
    from pipeline.release.tree import CodedGeoids

    out = []
    for i in range(len(geoids) - 1):
        parents, child = np.asarray(geoids[i]).astype(str), geoids[i + 1]
        if isinstance(child, CodedGeoids):
            codes, valid = parse_geoids(parents, digits[i])
            keep = np.flatnonzero(valid)  # (a malformed parent is no child's prefix)
            prefix, have = child.codes // 10 ** (digits[i + 1] - digits[i]), codes[keep]
        else:
            keep = None
            have = parents
            prefix = (np.asarray(child).astype(str).astype(f"<U{digits[i]}") if digits[i] > 0
                      else np.full(len(child), "", dtype="<U1"))
        idx = np.searchsorted(have, prefix)
        if idx.size and (idx.max() >= have.size or not np.array_equal(have[idx], prefix)):
            raise ReleaseError(f"level {i + 1}: a unit has no parent among the level above's GEOIDs")
        idx = idx if keep is None else keep[idx]
        out.append(np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=parents.size))]).astype(np.int64))
    return out


def child_ptrs_from_tree(tree: Any, geoids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`child_ptrs_from_geoids` for a :class:`pipeline.release.tree.GeoTree` (a lookup
    geography's published parent codes, or GEOID prefixes); ``geoids[i]``: level ``i``'s units in
    published order."""
    if not tree.is_lookup:
        return child_ptrs_from_geoids(geoids, [tree.digits[lv] for lv in tree.levels[:len(geoids)]])
    out = []
    for i in range(len(geoids) - 1):
        pos, found = tree.parent_positions(tree.levels[i], geoids[i], tree.levels[i + 1], geoids[i + 1])
        if not found.all() or (pos.size > 1 and np.any(pos[1:] < pos[:-1])):
            raise ReleaseError(f"level {i + 1}: a unit has no parent among the level above's units, or the units "
                               "are not grouped by parent")
        out.append(np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(geoids[i])))]).astype(np.int64))
    return out


_MARGINS_CACHE: dict[tuple, dict[tuple[str, str], np.ndarray | RepeatedRows]] = {}


def _spec_order(spec: Any) -> Callable[[str], tuple[int, str]]:
    """Sort key of query names: the spec's query order, unknown names after it by name."""
    order = {q: i for i, q in enumerate(spec.query_defs)} if spec is not None else {}
    return lambda q: (order.get(q, len(order)), q)


def _design_digest(ts: TableSet, by_kind: Mapping[str, Sequence[Any]]) -> str:
    """sha256 of everything margins of error depend on besides variances: each table's line
    matrix and each spec's cells, structural zeros and query partitions."""
    import hashlib

    h = hashlib.sha256()
    for kind, tabs in by_kind.items():
        spec = ts.specs[kind]
        h.update(f"{kind}|{spec.n_cells}|".encode())
        h.update(np.ascontiguousarray(spec.structural_zero_mask).tobytes())
        for q in spec.query_defs:
            h.update(f"|{q}|".encode())
            h.update(np.ascontiguousarray(spec.query(q).cell_to_answer, dtype=np.int64).tobytes())
        for t in tabs:
            m = t.matrix.tocsr()
            h.update(f"|{t.name}|{t.numbers}|".encode())
            for a in (m.indptr, m.indices, m.data):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def variances_from_privacy(privacy: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{kind: {level: {query: exact noise variance}}}`` from a privacy section (counts²).

    The variance of the discrete Gaussian N_Z(0, σ²) with σ² = 1/ρ_q, from the measurement
    design (:mod:`pipeline.model.design`; below σ², visibly so for σ < 1), i.e. the same
    weights post-processing uses.
    """
    return design_from_rho({kind: run["rho_by_level_query"] for kind, run in privacy["runs"].items()}).variances()


