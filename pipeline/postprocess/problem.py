"""Problem data: one parent with its k children, and a flat batch of parents of one level.

All histograms are dense over the cells of a spec (``spec.n_cells``). A child's targets are
per query ``y_q`` (float, ``(k, n_answers)``, NaN = not measured) with one variance ``v_q`` per
query, so the engine accepts any unbiased target with a known variance (raw measurements or
a better estimator's output), not only raw noisy answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import DptabError
from pipeline.model.spec import HistogramSpec


class PostprocessError(DptabError, RuntimeError):
    """A post-processing problem is malformed or its result violates a constraint."""


def bound_role(spec: HistogramSpec) -> str:
    """The query that carries per-child lower bounds and forced zeros: the spec's ``bound`` role
    (pl94: ``hhgq``); a spec without one gets its ``total`` query (no bounds then apply)."""
    for role in ("bound", "total"):
        if spec.has_role(role):
            return spec.role(role)
    return next(iter(spec.query_defs))


@dataclass
class ParentProblem:
    """One parent and its k children.

    - ``parent``: int64 ``(n_cells,)`` published parent histogram, or ``None`` at the root
      (then k = 1 and there is no consistency constraint).
    - ``targets``: query -> float ``(k, n_answers)`` with NaN where not measured.
    - ``variances``: query -> variance (persons^2) shared by all children.
    - ``totals``: optional int64 ``(k,)`` exact child totals (invariants).
    - ``lower``: optional int64 ``(k, n_answers(bound_query))`` lower bounds on the answers of
      ``bound_query`` (GQ facilities: persons in type g >= facilities of type g).
    - ``zero_answers``: optional bool ``(k, n_answers(zero_query))``: True forces every cell of
      that answer to 0 for that child (no facility of type g, no housing unit).
    - ``label``: the parent's GEOID or index, used in error messages.
    - ``allowed_mask``: optional bool ``(k, n_cells)`` replacing ``zero_answers`` (set by the
      feasibility fallback when it has to open cells).
    """

    spec: HistogramSpec
    parent: np.ndarray | None
    targets: dict[str, np.ndarray]
    variances: dict[str, float]
    totals: np.ndarray | None = None
    lower: np.ndarray | None = None
    zero_answers: np.ndarray | None = None
    bound_query: str = ""
    zero_query: str = ""
    label: str = ""
    allowed_mask: np.ndarray | None = None
    k: int = field(init=False)

    def __post_init__(self) -> None:
        self.bound_query = self.bound_query or bound_role(self.spec)
        self.zero_query = self.zero_query or self.bound_query
        ks = {np.asarray(y).shape[0] for y in self.targets.values()}
        if self.totals is not None:
            ks.add(len(self.totals))
        if len(ks) != 1:
            raise PostprocessError(f"parent {self.label}: inconsistent child counts {sorted(ks)}")
        self.k = ks.pop()
        for q, y in self.targets.items():
            na = self.spec.query(q).n_answers
            if np.asarray(y).shape != (self.k, na):
                raise PostprocessError(
                    f"parent {self.label}: targets[{q!r}] shape {np.shape(y)} != {(self.k, na)}"
                )
            if q not in self.variances or not self.variances[q] > 0:
                raise PostprocessError(f"parent {self.label}: query {q!r} needs a variance > 0")
        if self.parent is None and self.k != 1:
            raise PostprocessError(f"root problem {self.label}: needs exactly one child")
        if self.parent is not None:
            p = np.asarray(self.parent)
            if p.shape != (self.spec.n_cells,) or (p < 0).any():
                raise PostprocessError(f"parent {self.label}: parent histogram malformed")
            if (p[self.spec.structural_zero_mask] != 0).any():
                raise PostprocessError(f"parent {self.label}: parent has structural-zero cells")

    @property
    def has_parent(self) -> bool:
        return self.parent is not None

    def parent_float(self) -> np.ndarray:
        """The parent histogram as float64 (zeros at the root, where it is unused)."""
        if self.parent is None:
            return np.zeros(self.spec.n_cells)
        return np.asarray(self.parent, dtype=np.float64)

    def free_cells(self) -> np.ndarray:
        """Sorted cell ids that may be non-zero for some child: parent > 0, not structural zero."""
        ok = ~self.spec.structural_zero_mask
        if self.parent is not None:
            ok &= np.asarray(self.parent) > 0
        return np.nonzero(ok)[0].astype(np.int64)

    def allowed(self, cells: np.ndarray) -> np.ndarray:
        """Bool ``(k, len(cells))``: which child may be non-zero on which of ``cells``."""
        ok = np.ones((self.k, cells.size), dtype=bool)
        ok &= ~self.spec.structural_zero_mask[cells][None, :]
        if self.parent is not None:
            ok &= (np.asarray(self.parent)[cells] > 0)[None, :]
        if self.allowed_mask is not None:
            ok &= np.asarray(self.allowed_mask, dtype=bool)[:, cells]
        elif self.zero_answers is not None:
            c2a = self.spec.query(self.zero_query).cell_to_answer[cells]
            ok &= ~np.asarray(self.zero_answers, dtype=bool)[:, c2a]
        return ok

    def lower_bounds(self) -> np.ndarray | None:
        """Lower bounds as float ``(k, n_answers(bound_query))`` or None if all zero."""
        if self.lower is None or not np.any(np.asarray(self.lower) > 0):
            return None
        return np.asarray(self.lower, dtype=np.float64)


@dataclass
class LevelBatch:
    """All parents of one level as flat arrays with segment offsets.

    Children of parent ``i`` are rows ``child_ptr[i]:child_ptr[i+1]`` of every per-child array.
    ``parents`` is int64 ``(n_parents, n_cells)`` or a ``SparseHistogram``; per-child arrays as in :class:`ParentProblem`
    but with ``n_children`` rows.
    """

    spec: HistogramSpec
    parents: np.ndarray
    child_ptr: np.ndarray
    targets: dict[str, np.ndarray]
    variances: dict[str, float]
    totals: np.ndarray | None = None
    lower: np.ndarray | None = None
    zero_answers: np.ndarray | None = None
    labels: np.ndarray | None = None
    bound_query: str = ""
    zero_query: str = ""

    def __post_init__(self) -> None:
        self.bound_query = self.bound_query or bound_role(self.spec)
        self.zero_query = self.zero_query or self.bound_query
        if hasattr(self.parents, "dense"):  # a SparseHistogram (docs/contracts.md)
            sparse: Any = self.parents
            self.parents = sparse.dense(0, sparse.n_units)
        self.child_ptr = np.asarray(self.child_ptr, dtype=np.int64)
        n_par = self.child_ptr.size - 1
        if np.asarray(self.parents).shape != (n_par, self.spec.n_cells):
            raise PostprocessError(
                f"parents shape {np.shape(self.parents)} != {(n_par, self.spec.n_cells)}"
            )
        if (np.diff(self.child_ptr) < 0).any() or self.child_ptr[0] != 0:
            raise PostprocessError("child_ptr must be non-decreasing CSR offsets from 0")

    @property
    def n_parents(self) -> int:
        return int(self.child_ptr.size - 1)

    @property
    def n_children(self) -> int:
        return int(self.child_ptr[-1])

    def label(self, i: int) -> str:
        return str(self.labels[i]) if self.labels is not None else f"#{i}"

    def slice(self, start: int, stop: int) -> LevelBatch:
        """Parents ``start:stop`` as their own batch (rebased offsets), e.g. to ship to a worker."""
        a, b = int(self.child_ptr[start]), int(self.child_ptr[stop])

        def rows(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.asarray(x)[a:b]

        return LevelBatch(
            spec=self.spec, parents=np.asarray(self.parents)[start:stop],
            child_ptr=self.child_ptr[start:stop + 1] - a,
            targets={q: np.asarray(y)[a:b] for q, y in self.targets.items()},
            variances=self.variances, totals=rows(self.totals), lower=rows(self.lower),
            zero_answers=rows(self.zero_answers),
            labels=None if self.labels is None else np.asarray(self.labels)[start:stop],
            bound_query=self.bound_query, zero_query=self.zero_query,
        )

    def child_rows(self, idx: list[int] | np.ndarray) -> np.ndarray:
        """Row indices of the children of parents ``idx``, parent by parent."""
        idx = np.asarray(idx, dtype=np.int64)
        a, k = self.child_ptr[idx], np.diff(self.child_ptr)[idx]
        # a_i, a_i + 1, ..., a_i + k_i - 1 for every parent i, in one pass
        return np.repeat(a - np.cumsum(k) + k, k) + np.arange(int(k.sum()), dtype=np.int64)

    def take(self, idx: list[int] | np.ndarray) -> LevelBatch:
        """Parents ``idx`` (any order) as their own batch, e.g. to ship to a worker."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
            return self.slice(int(idx[0]), int(idx[0]) + idx.size)  # contiguous: views
        rows = self.child_rows(idx)
        k = np.diff(self.child_ptr)[idx]

        def take_rows(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.asarray(x)[rows]

        return LevelBatch(
            spec=self.spec, parents=np.asarray(self.parents)[idx],
            child_ptr=np.concatenate([[0], np.cumsum(k)]),
            targets={q: np.asarray(y)[rows] for q, y in self.targets.items()},
            variances=self.variances, totals=take_rows(self.totals), lower=take_rows(self.lower),
            zero_answers=take_rows(self.zero_answers),
            labels=None if self.labels is None else np.asarray(self.labels)[idx],
            bound_query=self.bound_query, zero_query=self.zero_query,
        )

    def problem(self, i: int) -> ParentProblem:
        """The :class:`ParentProblem` of parent ``i`` (views into the flat arrays)."""
        a, b = int(self.child_ptr[i]), int(self.child_ptr[i + 1])

        def rows(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.asarray(x)[a:b]

        return ParentProblem(
            spec=self.spec,
            parent=np.asarray(self.parents[i], dtype=np.int64),
            targets={q: np.asarray(y)[a:b] for q, y in self.targets.items()},
            variances=self.variances,
            totals=rows(self.totals),
            lower=rows(self.lower),
            zero_answers=rows(self.zero_answers),
            bound_query=self.bound_query,
            zero_query=self.zero_query,
            label=self.label(i),
        )
