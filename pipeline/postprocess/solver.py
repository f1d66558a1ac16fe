"""The engine's seam: options, the :class:`Solver` protocol, and the one place paths are chosen.

Every choice of code path for a parent's least squares is made here, with its threshold
named in :class:`Thresholds`:

- :func:`plan`: which parents of a level need no least squares (shortcut), which are solved
  together by the batched ADMM (``batched``) and in which groups, and which alone (``single``);
- :func:`domain_for` / :func:`objective`: whether a parent is solved on its free cells or on
  the full grid (which admits the Kronecker x-step);
- :func:`xstep_for`: dense (eigendecomposition) or Kronecker x-step for a single parent;
- :func:`kernel_flags`: which large-array kernels the one-parent ADMM uses (in-place rank-2
  x-step correction, warm-started projection, Kronecker ``H`` in the certificate).

A :class:`Solver` turns objectives (:class:`objective.Objective`) into certified real
solutions (:class:`objective.L2Result`). :class:`AdmmSolver` is production's;
a reference interior-point solver for the contract tests lives in ``tests/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from pipeline.postprocess.admm import admm, admm_batch
from pipeline.postprocess.objective import L2Result, Objective
from pipeline.postprocess.objective import objectives as build_objectives

if TYPE_CHECKING:
    from pipeline.model.spec import HistogramSpec
    from pipeline.postprocess.parent import Prepared


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every size threshold that selects a code path (none changes the optimum, only speed).

    ``batched``: solve small parents together by batched ADMM at all; a parent is batched
    when it has at most ``batch_max_cells`` free cells (dense x-step per parent) and at most
    ``batch_max_children`` children (beyond, the one-parent ADMM with its held-totals repair
    is faster: 100 children x 266 cells, 0.24 s alone vs 0.40 s batched). A batch holds at
    most ``batch_size`` parents, ``batch_max_bytes`` of (P, n, n) float64 matrices and
    ``batch_max_entries`` entries of the (P, K, n) iterates (larger batches leave the cache
    and get slower per parent).
    ``kron_min_cells``: free-set size from which a single parent is solved on the full grid
    with the Kronecker x-step (when its weights are uniform).
    ``inplace_min_entries``: k * n from which the x-step's consistency / row-total correction
    is one in-place rank-2 dgemm (below, two broadcast adds are fewer numpy calls).
    ``warm_projection_min_entries``: k * n from which the one-parent z-step projection is
    warm-started Newton (its ~15 numpy calls per step cost more than one sort on small
    parents; a batch always warm-starts, its one call covers every parent) and ``G' A`` is
    added run-wise in place.
    ``fast_hess_min_entries``: k * n from which ``value_grad`` uses the Kronecker ``H`` on
    the full grid (one structured pass instead of a segment sum per query).
    """

    batched: bool = True
    batch_size: int = 64
    batch_max_cells: int = 400
    batch_max_children: int = 64
    batch_max_bytes: int = 64 << 20
    batch_max_entries: int = 1 << 17
    kron_min_cells: int = 600
    inplace_min_entries: int = 20_000
    warm_projection_min_entries: int = 20_000
    fast_hess_min_entries: int = 100_000


@dataclasses.dataclass
class SolveOptions:
    """Tolerances and choices for one level.

    ``tol``: relative suboptimality certificate (gap <= tol * f); ``feas_tol``: largest
    violation (persons) of held/exact child totals and lower bounds accepted in the real
    solution; the rounding then meets exact totals and bounds exactly (2020 held pass-1 totals
    within an optimised tolerance plus 0.1); ``max_iter``: ADMM iterations before a solve is
    reported uncertified; ``multipass``: solve ``total`` alone first (2020 ordering for state,
    county, tract, block-group children); ``chain``: rounder chain (default
    ``spec.rounder_chain``); ``paths``: the path thresholds (:class:`Thresholds`);
    ``anderson``: history length of the ADMM's Anderson acceleration (``admm.Anderson``:
    batches and the dense one-parent x-step; 0 = plain ADMM). 8: on tract-shaped parents
    2-4x fewer iterations (5: a little less; 12-16: no better).
    """

    tol: float = 1e-9
    feas_tol: float = 1e-3
    max_iter: int = 5000
    multipass: bool = False
    chain: tuple[str, ...] | None = None
    paths: Thresholds = dataclasses.field(default_factory=Thresholds)
    anderson: int = 8


class Solver(Protocol):
    """Solves parents' least squares: one :class:`L2Result` per objective, in input order.

    ``objs`` share one path: ``batched=True`` only for parents :func:`plan` put in one batch
    (each with a parent), else any parents (each solved alone). Each result's ``Z`` is
    ``(k, n)`` on its objective's domain, C1-feasible (x >= 0, zeros, per-cell parent sums);
    ``certified`` means ``gap <= tol * f`` and ``infeas <= feas_tol`` (persons). Implementations
    must be picklable (they travel to the level's workers with the work items).
    """

    def solve(self, objs: Sequence[Objective], opts: SolveOptions,
              batched: bool) -> list[L2Result]: ...


@dataclasses.dataclass(frozen=True)
class KernelFlags:
    """Large-array kernels of the one-parent ADMM (see :class:`Thresholds`)."""

    inplace_xstep: bool
    warm_projection: bool
    fast_hess: bool


def kernel_flags(obj: Objective, th: Thresholds) -> KernelFlags:
    """Which large-array kernels the one-parent ADMM uses for ``obj`` (by its k * n)."""
    size = obj.k * obj.n
    return KernelFlags(
        inplace_xstep=size >= th.inplace_min_entries,
        warm_projection=size >= th.warm_projection_min_entries,
        fast_hess=(size >= th.fast_hess_min_entries and obj.n == obj.prob.spec.n_cells
                   and obj.uniform_weights() is not None),
    )


def domain_for(free: np.ndarray, spec: HistogramSpec, th: Thresholds) -> Literal["free", "full"]:
    """Domain of a parent's objective: the full grid (then the Kronecker x-step applies if the
    weights are uniform, checked by the caller) for large free sets, else the free cells."""
    if free.size < th.kron_min_cells:  # first: spec.n_cells is not free to evaluate
        return "free"
    return "full" if free.size < spec.n_cells else "free"


def objective(prep: Prepared, opts: SolveOptions, with_lower: bool) -> Objective:
    """The least-squares objective of a prepared parent's (last) pass, on the domain
    :func:`domain_for` chooses: the full grid only if its weights are uniform there (else the
    Kronecker x-step cannot apply), else the free cells. ``with_lower``: include the GQ lower
    bounds (the ``G X = W`` splitting)."""
    prob = prep.prob
    lower = prep.lower if with_lower else None
    free = prob.free_cells()
    if domain_for(free, prob.spec, opts.paths) == "full":
        full = Objective(prob, prep.queries, np.arange(prob.spec.n_cells), prep.totals, lower)
        if full.uniform_weights() is not None:
            return full
    return Objective(prob, prep.queries, free, prep.totals, lower)


def objectives(preps: Sequence[Prepared], opts: SolveOptions,
               with_lower: Sequence[bool]) -> list[Objective]:
    """``[objective(p, opts, wl) ...]``, the parents on their free cells assembled together
    (``objective.objectives``, per group of parents with the same queries; the same numbers)."""
    out: list[Objective | None] = [None] * len(preps)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, prep in enumerate(preps):
        free = prep.prob.free_cells()
        if domain_for(free, prep.prob.spec, opts.paths) == "free":
            groups.setdefault(prep.queries, []).append(i)
        else:
            out[i] = objective(prep, opts, with_lower[i])
    for queries, idx in groups.items():
        built = build_objectives(
            [preps[i].prob for i in idx], queries, [preps[i].prob.free_cells() for i in idx],
            [preps[i].totals for i in idx],
            [preps[i].lower if with_lower[i] else None for i in idx])
        for i, o in zip(idx, built):
            out[i] = o
    return out  # type: ignore[return-value]


def xstep_for(obj: Objective, th: Thresholds) -> Literal["kron", "dense"]:
    """Kronecker x-step when the domain is the full grid with uniform weights and at least
    ``kron_min_cells`` cells, else the dense (eigendecomposition) x-step. The Kronecker
    operator can still decline a spec (``ValueError``); the solver then falls back to dense."""
    if (obj.n == obj.prob.spec.n_cells and obj.n >= th.kron_min_cells
            and obj.uniform_weights() is not None):
        return "kron"
    return "dense"


def batchable(prep: Prepared, th: Thresholds) -> bool:
    """Whether the batched ADMM takes this parent: it needs a least-squares solve, has a
    parent and is small (``batch_max_cells`` free cells, ``batch_max_children`` children)."""
    return _batchable(prep.shortcut is None, prep.prob.has_parent, prep.prob.k,
                      prep.prob.free_cells().size, th)


def _batchable(solve: bool, has_parent: bool, k: int, n_free: int, th: Thresholds) -> bool:
    return (th.batched and solve and has_parent and k <= th.batch_max_children
            and n_free <= th.batch_max_cells)


def _batches(preps: list[tuple[int, Prepared]], th: Thresholds) -> list[list[int]]:
    """Group batchable parents by free-set size (little padding) under the size caps."""
    return _batches_by_size([(i, p.prob.k, int(p.prob.free_cells().size)) for i, p in preps], th)


def _batches_by_size(sizes: list[tuple[int, int, int]], th: Thresholds) -> list[list[int]]:
    """:func:`_batches` from ``(index, children, free cells)`` of each batchable parent."""
    sizes = sorted(sizes, key=lambda ikn: ikn[2])
    out: list[list[int]] = []
    cur: list[int] = []
    k_max = 0
    for i, k_i, n in sizes:
        k = max(k_max, k_i)
        if cur and (len(cur) == th.batch_size
                    or (len(cur) + 1) * n * n * 8 > th.batch_max_bytes
                    or (len(cur) + 1) * k * n > th.batch_max_entries):
            out.append(cur)
            cur, k = [], k_i
        cur.append(i)
        k_max = k
    return out + ([cur] if cur else [])


@dataclasses.dataclass
class LevelPlan:
    """Path of every prepared parent of a level (indices into the list given to :func:`plan`).

    ``shortcut``: no least squares (copy / empty / no children); ``single``: solved one by
    one, in this order; ``batches``: groups solved together by the batched ADMM.
    """

    shortcut: list[int]
    single: list[int]
    batches: list[list[int]]


def plan(preps: Sequence[Prepared], opts: SolveOptions) -> LevelPlan:
    """Decide each prepared parent's path (see the module docstring)."""
    return plan_sizes([p.shortcut is not None for p in preps],
                      [p.prob.has_parent for p in preps], [p.prob.k for p in preps],
                      [int(p.prob.free_cells().size) for p in preps], opts)


def plan_sizes(shortcut: Sequence[bool], has_parent: Sequence[bool], k: Sequence[int],
               n_free: Sequence[int], opts: SolveOptions) -> LevelPlan:
    """:func:`plan` from what it reads of each parent (whether it is a shortcut, has a
    parent, its children and free cells), all known before a parent is prepared: the
    preparation may relax a parent's constraints but never changes its free cells."""
    th = opts.paths
    out = LevelPlan([], [], [])
    small: list[tuple[int, int, int]] = []
    for i, (sc, hp, ki, ni) in enumerate(zip(shortcut, has_parent, k, n_free)):
        if sc:
            out.shortcut.append(i)
        elif _batchable(True, hp, ki, ni, th):
            small.append((i, ki, ni))
        else:
            out.single.append(i)
    out.batches = _batches_by_size(small, th)
    return out


def parent_cost(k: np.ndarray, n_free: np.ndarray, batched: np.ndarray) -> np.ndarray:
    """A rough relative cost of each parent's solve for balancing work items: children x
    free cells (the iterate size), x 4 on the one-parent path (larger parents take more
    iterations per entry), plus a per-parent set-up term. Only the order matters."""
    size = np.asarray(k, dtype=np.float64) * np.maximum(np.asarray(n_free), 1)
    return np.where(batched, size, 4.0 * size) + 200.0


@dataclasses.dataclass(frozen=True)
class AdmmSolver:
    """Production's :class:`Solver`: the batched ADMM for batches, else the one-parent ADMM
    with the x-step and kernels :func:`xstep_for` / :func:`kernel_flags` choose."""

    def solve(self, objs: Sequence[Objective], opts: SolveOptions,
              batched: bool) -> list[L2Result]:
        res = self._solve(objs, opts, batched, opts.anderson)
        if opts.anderson:
            # the acceleration has no convergence proof of its own: a parent it left
            # uncertified and off its totals / bounds (or non-finite) is solved again by the
            # plain ADMM (which has one), from the start. (Feasible but uncertified is the
            # certificate's rounding floor, the same either way: not repeated.)
            again = [i for i, r in enumerate(res) if not r.certified
                     and not (r.infeas <= opts.feas_tol and np.isfinite(r.gap))]
            if again:
                redo = self._solve([objs[i] for i in again], opts, batched, 0)
                for i, r in zip(again, redo):
                    res[i] = dataclasses.replace(r, method=r.method + "-plain")
        return res

    @staticmethod
    def _solve(objs: Sequence[Objective], opts: SolveOptions, batched: bool,
               anderson: int) -> list[L2Result]:
        if batched:
            return admm_batch(list(objs), tol=opts.tol, feas_tol=opts.feas_tol,
                              max_iter=opts.max_iter, anderson=anderson)
        th = opts.paths
        return [admm(o, xstep_for(o, th), kernel_flags(o, th), tol=opts.tol,
                     feas_tol=opts.feas_tol, max_iter=opts.max_iter, anderson=anderson)
                for o in objs]
