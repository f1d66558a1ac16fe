"""Post-processing benchmark: our least squares + rounding vs OSQP / Clarabel per parent.

Parents are synthetic (sparse Dirichlet populations, GQ facilities) shaped like each level,
with the 2020 production variances of ``schemas/strategies/census2020_pl94.yaml``
(sigma^2 = 1 / (2 rho_q)). Per level shape, our time per parent exactly as production runs
it (median of 3): the L2 stage including preparation (feasibility, multipass pass-1 totals;
batched ADMM at the block and block-group shapes, as ``solve_level`` does), and the whole
parent solve (L2 + rounding + checks) through ``solve_level``. OSQP and Clarabel solve the
same QPs one parent at a time, lifted (the formulation the 2020 DAS gave Gurobi), with a time
limit; every solution's objective is compared to the best certified lower bound
``f_ours - gap_ours``. Last line: JSON summary.

    .venv/bin/python benchmarks/postprocess.py --quick      # < 5 minutes
    .venv/bin/python benchmarks/postprocess.py              # adds a county with 3,000 tracts
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import yaml
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from postprocess_cases import infeasibility, random_parent  # noqa: E402

from benchmarks.timing import median_time  # noqa: E402
from pipeline.postprocess.objective import Objective  # noqa: E402
from pipeline.postprocess.parent import objective, prepare_parent, solve_least_squares, solve_parent  # noqa: E402
from pipeline.postprocess.problem import LevelBatch, PostprocessError  # noqa: E402
from pipeline.postprocess.solver import SolveOptions, Thresholds, plan  # noqa: E402
from pipeline.postprocess.topdown import solve_level  # noqa: E402

US_BLOCK_GROUPS = 239_780  # parents at the block level (2020 Census block groups)


def production_variances(level: str) -> dict[str, float]:
    raw = yaml.safe_load((ROOT / "schemas/strategies/census2020_pl94.yaml").read_text())
    rho = Fraction(raw["rho"])
    L = raw["levels"][level]
    return {q: float(1 / (2 * rho * Fraction(L["share"]) * Fraction(s)))
            for q, s in L["queries"].items()}


def lifted_qp(obj: Objective):
    """Lifted QP: variables [x (allowed entries), a_q (answers)], P diagonal on a_q."""
    k, n = obj.k, obj.n
    idx = np.flatnonzero(obj.allowed.ravel())
    cc, jj = np.unravel_index(idx, (k, n))
    nv = idx.size
    blocks, pdiag, qvec = [], [], []
    na_tot = 0
    for q in obj.queries:
        t = obj.sys.terms[q]
        m = t.n_local
        rows = cc * m + t.ans[jj]
        Q = sp.csr_matrix((np.ones(nv), (rows, np.arange(nv))), shape=(k * m, nv))
        w = np.tile(obj.w[q], k)
        keep = w > 0
        Q = Q[keep]
        blocks.append(Q)
        pdiag.append(w[keep])
        qvec.append(-(w * obj.y[q].ravel())[keep])
        na_tot += int(keep.sum())
    Qall = sp.vstack(blocks).tocsr()
    nx = nv + na_tot
    P = sp.diags(np.concatenate([np.full(nv, 0.0), np.concatenate(pdiag)])).tocsc()
    qv = np.concatenate([np.zeros(nv), np.concatenate(qvec)])
    A_eq = [sp.hstack([Qall, -sp.eye(na_tot)])]
    b_eq = [np.zeros(na_tot)]
    if obj.consistency:
        A_eq.append(sp.hstack([sp.csr_matrix((np.ones(nv), (jj, np.arange(nv))), shape=(n, nv)),
                               sp.csr_matrix((n, na_tot))]))
        b_eq.append(obj.p)
    if obj.totals is not None:
        A_eq.append(sp.hstack([sp.csr_matrix((np.ones(nv), (cc, np.arange(nv))), shape=(k, nv)),
                               sp.csr_matrix((k, na_tot))]))
        b_eq.append(obj.totals)
    A_in = [sp.hstack([sp.eye(nv), sp.csr_matrix((nv, na_tot))])]
    l_in = [np.zeros(nv)]
    if obj.lower is not None:
        t = obj.sys.terms[obj.prob.bound_query]
        G = sp.csr_matrix((np.ones(nv), (cc * t.n_local + t.ans[jj], np.arange(nv))),
                          shape=(k * t.n_local, nv))
        A_in.append(sp.hstack([G, sp.csr_matrix((G.shape[0], na_tot))]))
        l_in.append(obj.lower.ravel())
    return dict(P=P, q=qv, A_eq=sp.vstack(A_eq).tocsc(), b_eq=np.concatenate(b_eq),
                A_in=sp.vstack(A_in).tocsc(), l_in=np.concatenate(l_in), idx=idx, nv=nv, nx=nx)


def _unlift(obj, qp, x):
    Z = np.zeros(obj.k * obj.n)
    Z[qp["idx"]] = x[: qp["nv"]]
    return Z.reshape(obj.k, obj.n)


def run_osqp(obj, qp, time_limit):
    import osqp

    A = sp.vstack([qp["A_eq"], qp["A_in"]]).tocsc()
    lo = np.concatenate([qp["b_eq"], qp["l_in"]])
    hi = np.concatenate([qp["b_eq"], np.full(qp["l_in"].size, np.inf)])
    t0 = time.perf_counter()
    m = osqp.OSQP()
    m.setup(P=sp.triu(qp["P"]).tocsc(), q=qp["q"], A=A, l=lo, u=hi, eps_abs=1e-7,
            eps_rel=1e-7, max_iter=200_000, time_limit=time_limit, verbose=False, polishing=True)
    r = m.solve()
    secs = time.perf_counter() - t0
    if r.x is None or r.x[0] is None:
        return secs, None, "no solution"
    return secs, _unlift(obj, qp, np.asarray(r.x)), str(r.info.status)


def run_clarabel(obj, qp, time_limit):
    import clarabel

    A = sp.vstack([qp["A_eq"], -qp["A_in"]]).tocsc()
    b = np.concatenate([qp["b_eq"], -qp["l_in"]])
    cones = [clarabel.ZeroConeT(qp["b_eq"].size), clarabel.NonnegativeConeT(qp["l_in"].size)]
    s = clarabel.DefaultSettings()
    s.verbose = False
    s.time_limit = time_limit
    t0 = time.perf_counter()
    sol = clarabel.DefaultSolver(sp.triu(qp["P"]).tocsc(), qp["q"], A, b, cones, s).solve()
    secs = time.perf_counter() - t0
    return secs, _unlift(obj, qp, np.asarray(sol.x)), str(sol.status)


def ours_l2(probs, opts, batched):
    """Our least-squares stage exactly as production runs it (``solve_least_squares``: without
    the GQ bounds first, with them where violated), batched by free-set size when ``batched``.
    Returns the prepared parents (with their stats) and the real solutions (k, n_cells)."""
    if not batched:
        opts = SolveOptions(**{**opts.__dict__, "paths": Thresholds(batched=False)})
    preps = [prepare_parent(p, opts) for p in probs]
    X = [None] * len(preps)
    paths = plan(preps, opts)  # as solve_level: small parents batched by size
    for g in paths.batches:
        for i, x in zip(g, solve_least_squares([preps[i] for i in g], opts, True)):
            X[i] = x
    for i in paths.single:
        X[i] = solve_least_squares([preps[i]], opts)[0]
    for i in paths.shortcut:
        X[i] = preps[i].shortcut.astype(np.float64)
    return preps, X


def with_objectives(preps, X, opts):
    """Per parent (objective of the full problem, real solution on its domain, stats)."""
    out = []
    for p, x in zip(preps, X):
        obj = objective(p, opts, with_lower=True)
        out.append((obj, x[:, obj.domain], p.st))
    return out


def consistency_error(obj, Z):
    err = float(np.abs(Z.sum(axis=0) - obj.p).max()) if obj.consistency else 0.0
    err = max(err, float(-Z.min(initial=0.0)))
    return max(err, infeasibility(obj, Z))


CASES = {
    # level: (children, persons per child, Dirichlet alpha, multipass, batched, parents quick, full)
    "block": (30, 6, 0.02, False, True, 64, 128),
    "block_group": (4, 300, 0.03, True, True, 128, 256),
    "tract": (30, 600, 0.3, True, True, 1, 3),
    # households and every GQ type populated: free set = the full grid (Kronecker x-step)
    "tract_dense": (30, 600, 1.0, False, False, 1, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-limit", type=float, default=None, help="per OSQP/Clarabel solve, s")
    ap.add_argument("--osqp-parents", type=int, default=8,
                    help="parents per batched level also solved by OSQP / Clarabel")
    args = ap.parse_args()
    limit = args.time_limit or (20.0 if args.quick else 300.0)
    rows, violations, large, levels = [], 0, None, {}
    with threadpool_limits(1, "blas"):
        for level, (k, pop, alpha, multipass, batched, nq, nf) in CASES.items():
            opts = SolveOptions(tol=1e-9, multipass=multipass)
            var_level = "tract" if level.startswith("tract") else level
            probs = [random_parent(k=k, pop=pop, seed=100 + s, alpha=alpha,
                                   variances=production_variances(var_level),
                                   gq=level != "tract_dense")[0]
                     for s in range(nq if args.quick else nf)]
            # production path: L2 per parent (batched where production batches), then the
            # whole parent solve (L2 + rounding + checks) through solve_level
            t_l2, (preps, X) = median_time(lambda: ours_l2(probs, opts, batched))
            sols = with_objectives(preps, X, opts)
            t_single = None
            if batched:
                t_single, _ = median_time(lambda: ours_l2(probs, opts, False))
            def cat(f):
                parts = [f(p) for p in probs]
                return None if parts[0] is None else np.concatenate(parts)

            lb = LevelBatch(probs[0].spec, np.stack([p.parent for p in probs]),
                            np.concatenate([[0], np.cumsum([p.k for p in probs])]),
                            {q: cat(lambda p: p.targets[q]) for q in probs[0].targets},
                            probs[0].variances, lower=cat(lambda p: p.lower),
                            zero_answers=cat(lambda p: p.zero_answers))
            try:
                t_full, (_, diag) = median_time(lambda: solve_level(lb, opts, level=level))
            except PostprocessError as exc:
                violations += 1
                print(f"VIOLATION {level}: {exc}", file=sys.stderr)
                continue
            n = len(probs)
            levels[level] = dict(parents=n, batched=batched, ours_l2_s=t_l2 / n,
                                 ours_l2_unbatched_s=None if t_single is None else t_single / n,
                                 ours_full_s=t_full / n, methods=diag.methods,
                                 max_rel_gap=diag.max_rel_gap, uncertified=diag.uncertified)
            print(json.dumps(dict(level=level, **levels[level])), flush=True)
            # reference solvers on (a sample of) the same QPs, one parent at a time
            for prob, (obj, Z, st) in list(zip(probs, sols))[: args.osqp_parents]:
                f = obj.value(Z)
                lbound = f - st.gap  # certified lower bound on f*
                row = dict(level=level, k=prob.k, free=int(prob.free_cells().size),
                           variables=int(obj.allowed.sum()), ours_l2_s=t_l2 / n,
                           iterations=st.iterations, method=st.method, certified=st.certified,
                           ours_rel_gap=st.gap / max(f, 1e-300),
                           ours_consistency_err=consistency_error(obj, Z))
                if obj.allowed.sum() <= 400_000:
                    qp = lifted_qp(obj)
                    sec, Zr, status = run_osqp(obj, qp, limit)
                    row.update(osqp_s=sec, osqp_status=status)
                    if Zr is not None:
                        row["osqp_rel_gap"] = (obj.value(Zr) - lbound) / f
                        row["osqp_consistency_err"] = consistency_error(obj, Zr)
                    if obj.allowed.sum() <= 20_000:
                        sec, Zr, status = run_clarabel(obj, qp, limit)
                        row.update(clarabel_s=sec, clarabel_status=status,
                                   clarabel_rel_gap=(obj.value(Zr) - lbound) / f,
                                   clarabel_consistency_err=consistency_error(obj, Zr))
                rows.append(row)
                print(json.dumps({k2: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                  for k2, v in row.items()}), flush=True)
        if not args.quick:
            # a county with 3,000 tracts: multipass (pass 2 well conditioned), tol 1e-6; one
            # run, no reference solver (OSQP / Clarabel cannot finish)
            prob, _ = random_parent(k=3000, pop=40, seed=100, alpha=1.0,
                                    variances=production_variances("tract"), gq=True)
            t0 = time.perf_counter()
            try:
                _, st = solve_parent(prob, SolveOptions(tol=1e-6, multipass=True))
                large = dict(level="county_3000_tracts", k=3000, free=int(prob.free_cells().size),
                             seconds=time.perf_counter() - t0, iterations=st.iterations,
                             method=st.method, rel_gap=st.rel_gap, certified=st.certified)
                print(json.dumps(large), flush=True)
            except PostprocessError as exc:
                violations += 1
                print(f"VIOLATION county: {exc}", file=sys.stderr)
    speed = [r["osqp_s"] / r["ours_l2_s"] for r in rows if "osqp_s" in r]
    per_level = {}
    for lv, info in levels.items():
        rs = [r for r in rows if r["level"] == lv and "osqp_s" in r]
        osqp = statistics.median(r["osqp_s"] for r in rs) if rs else None
        per_level[lv] = dict(info, osqp_s=osqp,
                             speedup_vs_osqp=None if osqp is None else osqp / info["ours_l2_s"])
    block_s = levels["block"]["ours_full_s"] if "block" in levels else None
    summary = dict(
        speedup_vs_osqp=min(speed) if speed else None,
        median_speedup_vs_osqp=statistics.median(speed) if speed else None,
        max_rel_objective_gap=max([r["ours_rel_gap"] for r in rows]
                                  + [v["max_rel_gap"] for v in levels.values()]),
        max_osqp_rel_gap=max((r.get("osqp_rel_gap", 0.0) for r in rows), default=None),
        consistency_violations=violations,
        max_ours_consistency_err=max(r["ours_consistency_err"] for r in rows),
        per_level=per_level,
        us_block_level_core_hours=None if block_s is None else block_s * US_BLOCK_GROUPS / 3600,
        us_block_level_hours_2_cores=None if block_s is None else block_s * US_BLOCK_GROUPS / 7200,
        osqp_time_limit_s=limit,
        large_parent=large,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
