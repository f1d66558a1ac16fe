"""Per-parent and per-level diagnostics, returned as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ParentStats:
    """What happened on one parent (units: persons for infeas, objective units for gap)."""

    variables: int = 0
    iterations: int = 0
    gap: float = 0.0
    rel_gap: float = 0.0
    spread: float = 0.0
    infeas: float = 0.0
    certified: bool = True
    method: str = ""
    relaxed_constraints: int = 0
    multipass_fallback: int = 0
    uncertified: int = 0
    rounding_widened: int = 0
    dropped_answers: int = 0
    shortcut: str = ""


@dataclass
class LevelDiagnostics:
    """Aggregate over the parents of one level (one row of the run's diagnostics)."""

    level: str
    parents: int = 0
    children: int = 0
    variables: int = 0
    iterations: int = 0
    max_iterations: int = 0
    max_rel_gap: float = 0.0
    max_kkt_spread: float = 0.0
    max_infeas: float = 0.0
    fallbacks: int = 0
    relaxed_constraints: int = 0
    multipass_fallback: int = 0
    uncertified: int = 0
    rounding_widened: int = 0
    dropped_answers: int = 0
    shortcuts: int = 0
    seconds: float = 0.0
    methods: dict[str, int] = field(default_factory=dict)

    def add(self, s: ParentStats, k: int) -> None:
        self.parents += 1
        self.children += k
        self.variables += s.variables
        self.iterations += s.iterations
        self.max_iterations = max(self.max_iterations, s.iterations)
        self.max_rel_gap = max(self.max_rel_gap, s.rel_gap)
        self.max_kkt_spread = max(self.max_kkt_spread, s.spread)
        self.max_infeas = max(self.max_infeas, s.infeas)
        self.relaxed_constraints += s.relaxed_constraints
        self.multipass_fallback += s.multipass_fallback
        self.uncertified += s.uncertified
        self.rounding_widened += s.rounding_widened
        self.dropped_answers += s.dropped_answers
        self.fallbacks += int(
            bool(s.relaxed_constraints or s.multipass_fallback or s.uncertified
                 or s.rounding_widened)
        )
        if s.shortcut:
            self.shortcuts += 1
        key = s.shortcut or s.method
        self.methods[key] = self.methods.get(key, 0) + 1

    def merge(self, other: LevelDiagnostics) -> None:
        for f in ("parents", "children", "variables", "iterations", "fallbacks",
                  "relaxed_constraints", "multipass_fallback", "uncertified",
                  "rounding_widened", "dropped_answers", "shortcuts"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("max_iterations", "max_rel_gap", "max_kkt_spread", "max_infeas"):
            setattr(self, f, max(getattr(self, f), getattr(other, f)))
        for kk, v in other.methods.items():
            self.methods[kk] = self.methods.get(kk, 0) + v

    def as_dict(self) -> dict:
        return asdict(self)
