"""Synthetic post-processing cases: seeded parents and small hierarchies with GQ facilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.model.spec import HistogramSpec, load_spec
from pipeline.postprocess import (
    LevelBatch,
    LevelDiagnostics,
    ParentProblem,
    PostprocessError,
    SolveOptions,
    solve_level,
    solve_root,
)

PL94 = load_spec("pl94")


def person_cells(spec: HistogramSpec, rng: np.random.Generator, g: int, n: int,
                 base: np.ndarray) -> np.ndarray:
    """Histogram (n_cells,) of n persons of hhgq type g drawn from ``base`` weights."""
    hh = spec.query("hhgq").cell_to_answer
    w = np.where((hh == g) & ~spec.structural_zero_mask, base, 0.0)
    return rng.multinomial(n, w / w.sum())


def noisy_targets(spec, truth, rng, variances):
    """Targets = true answers + Gaussian noise (NaN never used here)."""
    out = {}
    for q, v in variances.items():
        a = spec.query(q).answer(truth).astype(float)
        out[q] = a + rng.normal(0.0, np.sqrt(v), a.shape)
    return out


def default_variances(spec: HistogramSpec, scale: float = 1.0) -> dict[str, float]:
    return {q: scale * (1.0 + (i % 4)) for i, q in enumerate(spec.query_names)}


def random_parent(k: int = 10, pop: int = 50, seed: int = 0, spec: HistogramSpec = PL94,
                  variances: dict | None = None, alpha: float = 0.05,
                  gq: bool = False) -> tuple[ParentProblem, np.ndarray]:
    """A parent with k children (truth from a sparse Dirichlet), noisy targets, optional GQ."""
    rng = np.random.default_rng(seed)
    base = rng.dirichlet(np.full(spec.n_cells, alpha))
    base[spec.structural_zero_mask] = 0.0
    base /= base.sum()
    truth = np.stack([rng.multinomial(int(rng.poisson(pop)) + 1, base) for _ in range(k)])
    truth[:, spec.structural_zero_mask] = 0
    lower = zero = None
    if gq and spec.name == "pl94":
        fac = np.zeros((k, 8), dtype=np.int64)
        for c in range(k):
            if rng.random() < 0.4:
                g = int(rng.integers(1, 8))
                fac[c, g] = 1 + int(rng.integers(0, 2))
        hh = spec.query("hhgq").cell_to_answer
        for c in range(k):
            for g in range(1, 8):
                truth[c, hh == g] = 0
                if fac[c, g]:
                    truth[c] += person_cells(spec, rng, g, fac[c, g] + int(rng.poisson(8)), base + 1e-3)
        lower = fac
        zero = np.zeros((k, 8), dtype=bool)
        zero[:, 1:] = fac[:, 1:] == 0
    v = variances or default_variances(spec)
    targets = noisy_targets(spec, truth, rng, v)
    prob = ParentProblem(spec, truth.sum(axis=0), targets, v, lower=lower, zero_answers=zero,
                         label=f"synthetic-{seed}")
    return prob, truth


@dataclass
class LevelInput:
    """Inputs of one level for :func:`run_levels` (arrays over that level's units).

    ``child_ptr``: CSR offsets from the level above (None for the root level); ``targets``
    per query ``(n_units, n_answers)``; ``totals``/``lower``/``zero_answers`` per unit.
    """

    name: str
    targets: dict[str, np.ndarray]
    variances: dict[str, float]
    child_ptr: np.ndarray | None = None
    totals: np.ndarray | None = None
    lower: np.ndarray | None = None
    zero_answers: np.ndarray | None = None
    labels: np.ndarray | None = None
    multipass: bool = False


def run_levels(spec: HistogramSpec, levels: list[LevelInput], options: SolveOptions | None = None,
               mapper=None, chunks: int = 1) -> tuple[dict[str, np.ndarray], list[LevelDiagnostics]]:
    """Test helper: ``solve_root`` then ``solve_level`` for every level below, each level's
    published histograms the next one's parents. Returns ``{level: int64 (n_units, n_cells)}``
    and the diagnostics per level."""
    import dataclasses

    options = options or SolveOptions()
    root = levels[0]
    hist, d0 = solve_root(
        spec, root.targets, root.variances,
        None if root.totals is None else int(np.asarray(root.totals).ravel()[0]),
        root.lower, root.zero_answers, options, label=root.name,
    )
    d0.level = root.name
    out = {root.name: hist[None, :]}
    diags = [d0]
    parents = hist[None, :]
    parent_labels = None if root.labels is None else np.asarray(root.labels)
    for lev in levels[1:]:
        if lev.child_ptr is None:
            raise PostprocessError(f"level {lev.name!r} needs child_ptr")
        batch = LevelBatch(
            spec, parents, lev.child_ptr, lev.targets, lev.variances, lev.totals, lev.lower,
            lev.zero_answers, labels=parent_labels,
        )
        parent_labels = None if lev.labels is None else np.asarray(lev.labels)
        opts = dataclasses.replace(options, multipass=lev.multipass)
        parents, d = solve_level(batch, opts, level=lev.name, mapper=mapper, chunks=chunks)
        out[lev.name] = parents
        diags.append(d)
    return out, diags


def hierarchy(seed: int = 0, fanout=(2, 2, 2, 3, 4), spec: HistogramSpec = PL94,
              block_pop: int = 25, scale: float = 1.0) -> tuple[list[LevelInput], dict]:
    """nation -> state -> county -> tract -> block group -> block with GQ facilities.

    Returns the per-level inputs for ``run_levels`` (state totals invariant; GQ lower bounds
    and zeros from facilities, household zeros where a block has no housing unit) and truth.
    """
    rng = np.random.default_rng(seed)
    names = ["nation", "state", "county", "tract", "block_group", "block"]
    counts = [1]
    ptrs = []
    for f in fanout:
        sizes = rng.integers(1, f + 1, size=counts[-1])
        sizes[0] = f  # at least one parent with several children at every level
        ptrs.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        counts.append(int(sizes.sum()))
    nb = counts[-1]
    base = rng.dirichlet(np.full(spec.n_cells, 0.1))
    base[spec.structural_zero_mask] = 0
    base /= base.sum()
    truth = np.zeros((nb, spec.n_cells), dtype=np.int64)
    fac = np.zeros((nb, 8), dtype=np.int64)
    housing = rng.poisson(8, size=nb) * (rng.random(nb) < 0.9)
    for b in range(nb):
        if housing[b]:
            truth[b] += person_cells(spec, rng, 0, int(rng.poisson(block_pop)), base + 1e-4)
        if rng.random() < 0.15:
            g = int(rng.integers(1, 8))
            fac[b, g] = 1
            truth[b] += person_cells(spec, rng, g, 1 + int(rng.poisson(10)), base + 1e-3)
    level_truth = [truth]
    level_fac = [fac]
    level_hu = [housing]
    for ptr in reversed(ptrs):
        def agg(x, ptr=ptr):  # every parent has >= 1 child, so reduceat sums its children
            return np.add.reduceat(x, ptr[:-1], axis=0)

        level_truth.insert(0, agg(level_truth[0]))
        level_fac.insert(0, agg(level_fac[0]))
        level_hu.insert(0, agg(level_hu[0]))
    v = default_variances(spec, scale)
    levels = []
    for i, name in enumerate(names):
        t, f, h = level_truth[i], level_fac[i], level_hu[i]
        zero = np.zeros((t.shape[0], 8), dtype=bool)
        zero[:, 1:] = f[:, 1:] == 0
        zero[:, 0] = h == 0
        levels.append(LevelInput(
            name=name, targets=noisy_targets(spec, t, rng, v), variances=v,
            child_ptr=None if i == 0 else ptrs[i - 1],
            totals=t.sum(axis=1) if name in ("nation", "state") else None,
            lower=f, zero_answers=zero,
            labels=np.array([f"{name}-{j}" for j in range(t.shape[0])]),
            multipass=name in ("state", "county", "tract", "block_group"),
        ))
    return levels, {n: t for n, t in zip(names, level_truth)}


def _clarabel(obj):
    """Clarabel's solution of an :class:`Objective`'s QP: ``(Z (k, n), solution)``.

    Variables are the allowed (child, domain cell) entries; constraints: per-cell parent sums
    (with a parent), held row totals, x >= 0, lower bounds on the bound query."""
    import clarabel
    import scipy.sparse as sp

    from pipeline.postprocess.operators import dense_normal_matrix

    k, n = obj.k, obj.n
    H = dense_normal_matrix(obj.sys, obj.w)
    idx = np.flatnonzero(obj.allowed.ravel())
    P = sp.kron(sp.eye(k), sp.csr_matrix(H)).tocsc()[idx][:, idx]
    q = -obj.b.ravel()[idx]
    cc, jj = np.unravel_index(idx, (k, n))
    nv = idx.size
    A_rows, b_rows, cones = [], [], []
    if obj.consistency:
        A_rows.append(sp.csr_matrix((np.ones(nv), (jj, np.arange(nv))), shape=(n, nv)))
        b_rows.append(obj.p)
        cones.append(clarabel.ZeroConeT(n))
    if obj.totals is not None:
        A_rows.append(sp.csr_matrix((np.ones(nv), (cc, np.arange(nv))), shape=(k, nv)))
        b_rows.append(obj.totals)
        cones.append(clarabel.ZeroConeT(k))
    A_rows.append(-sp.eye(nv, format="csr"))
    b_rows.append(np.zeros(nv))
    cones.append(clarabel.NonnegativeConeT(nv))
    if obj.lower is not None:
        t = obj.sys.terms[obj.prob.bound_query]
        ng = t.n_local
        A_rows.append(sp.csr_matrix((-np.ones(nv), (cc * ng + t.ans[jj], np.arange(nv))),
                                    shape=(k * ng, nv)))
        b_rows.append(-obj.lower.ravel())
        cones.append(clarabel.NonnegativeConeT(k * ng))
    A = sp.vstack(A_rows).tocsc()
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = 1e-12
    settings.tol_feas = 1e-12
    sol = clarabel.DefaultSolver(sp.triu(P).tocsc(), q, A, np.concatenate(b_rows), cones,
                                 settings).solve()
    Z = np.zeros(k * n)
    Z[idx] = np.asarray(sol.x)
    return Z.reshape(k, n), sol


def reference_qp(obj) -> tuple[np.ndarray, float]:
    """Solve an :class:`Objective` with Clarabel (interior point) as a reference:
    ``(Z (k, n), f(Z))``."""
    Z, _ = _clarabel(obj)
    return Z, obj.value(Z)


@dataclass(frozen=True)
class ReferenceSolver:
    """A second implementation of the engine's ``Solver`` protocol (tests only): every
    objective alone by Clarabel's interior point method, batched or not.

    ``Z`` is Clarabel's point projected onto C1 (x >= 0 and the parent sums to working
    precision, as the protocol promises); ``gap`` is Clarabel's primal-dual objective gap
    and ``spread`` the larger of its primal / dual KKT residuals."""

    def solve(self, objs, opts, batched):
        from pipeline.postprocess.objective import L2Result

        out = []
        for o in objs:
            Z, sol = _clarabel(o)
            Z = o.project(Z)
            f = o.value(Z)
            ok = str(sol.status) == "Solved"
            out.append(L2Result(Z, f, abs(float(sol.obj_val) - float(sol.obj_val_dual)),
                                max(float(sol.r_prim), float(sol.r_dual)),
                                infeasibility(o, Z), int(sol.iterations), ok, "clarabel"))
        return out


def run_admm(obj, xstep: str = "auto", kron_min_cells: int = 600, **kw):
    """The one-parent ADMM on ``obj`` as production runs it, with the x-step ``xstep``
    ("dense", "kron" or "auto": the one ``solver.xstep_for`` picks under ``kron_min_cells``)."""
    from pipeline.postprocess.admm import admm
    from pipeline.postprocess.solver import Thresholds, kernel_flags, xstep_for

    th = Thresholds(kron_min_cells=kron_min_cells)
    return admm(obj, xstep_for(obj, th) if xstep == "auto" else xstep, kernel_flags(obj, th), **kw)


def workspace(obj, **flags):
    """The one-parent ADMM's workspace on ``obj`` (production kernel flags unless given)."""
    from pipeline.postprocess.admm import Workspace
    from pipeline.postprocess.solver import KernelFlags, Thresholds, kernel_flags

    f = kernel_flags(obj, Thresholds())
    return Workspace(obj, KernelFlags(**{**f.__dict__, **flags}))


def certificate_gap(obj, Z, alpha=None, nu=None, mu: float = 0.0) -> tuple[float, float]:
    """``(f(Z), certified bound on f(Z) - f*)`` at a C1 point Z of ``obj`` (modulus ``mu``)."""
    from pipeline.postprocess.certificate import lower_bound

    ws = workspace(obj)
    ws.mu = mu
    f, grad = ws.value_grad(Z)
    lb, _ = lower_bound(ws, Z, f, grad, alpha, nu)
    return f, max(f - float(lb), 0.0)


def infeasibility(obj, Z) -> float:
    """Largest violation of ``obj``'s held totals / lower bounds at Z (persons)."""
    from pipeline.postprocess.certificate import infeasibility as infeas

    return float(infeas(workspace(obj), Z))
