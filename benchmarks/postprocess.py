"""Post-processing benchmark: our least squares + rounding vs OSQP / Clarabel per parent.

Parents are synthetic (sparse Dirichlet populations, GQ facilities) shaped like each level,
with the 2020 production variances of ``schemas/strategies/census2020_pl94.yaml``
(sigma^2 = 1 / (2 rho_q)). For each parent: time of our L2 stage (median of 3), of the full
parent solve (L2 + rounding + checks), OSQP and Clarabel on the lifted QP (the formulation
the 2020 DAS gave Gurobi) with a time limit, and the objective gap of every solution to the
best certified lower bound ``f_ours - gap_ours``. Last line: JSON summary.

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

from postprocess_cases import random_parent  # noqa: E402

from pipeline.postprocess.least_squares import admm, choose_inverse  # noqa: E402
from pipeline.postprocess.objective import L2Objective  # noqa: E402
from pipeline.postprocess.parent import SolveOptions, solve_parent  # noqa: E402
from pipeline.postprocess.problem import LevelBatch, PostprocessError  # noqa: E402
from pipeline.postprocess.batched import solve_batch  # noqa: E402
from pipeline.postprocess.topdown import solve_level  # noqa: E402

US_BLOCK_GROUPS = 239_780  # parents at the block level (2020 Census block groups)


def production_variances(level: str) -> dict[str, float]:
    raw = yaml.safe_load((ROOT / "schemas/strategies/census2020_pl94.yaml").read_text())
    rho = Fraction(raw["rho"])
    L = raw["levels"][level]
    return {q: float(1 / (2 * rho * Fraction(L["share"]) * Fraction(s)))
            for q, s in L["queries"].items()}


def lifted_qp(obj: L2Objective):
    """Lifted QP: variables [x (allowed entries), a_q (answers)], P diagonal on a_q."""
    k, n = obj.k, obj.n
    idx = np.flatnonzero(obj.allowed.ravel())
    cc, jj = np.unravel_index(idx, (k, n))
    nv = idx.size
    blocks, pdiag, qvec, eq_rows = [], [], [], []
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


def ours_l2(prob, opts, lower="auto"):
    """Our L2 stage as production runs it: without the GQ bounds first (optimal if they hold),
    with them (ADMM splitting) otherwise."""
    low = prob.lower_bounds()
    if lower == "auto" and low is not None:
        obj, res = ours_l2(prob, opts, lower=None)
        if (prob.spec.query(prob.bound_query).answer(_full(prob, obj, res.Z)) >= low - 1e-7).all():
            return obj, res
    use = low if lower == "auto" else None
    obj = L2Objective(prob, tuple(prob.targets), prob.free_cells(), None, use)
    if prob.free_cells().size >= opts.kron_min_cells:
        full = L2Objective(prob, tuple(prob.targets), np.arange(prob.spec.n_cells), None, use)
        if full.uniform_weights() is not None:
            obj = full
    inv, method = choose_inverse(obj, opts.kron_min_cells)
    res = admm(obj, inv, tol=opts.tol, feas_tol=opts.feas_tol, max_iter=opts.max_iter, method=method)
    return obj, res


def _full(prob, obj, Z):
    X = np.zeros((prob.k, prob.spec.n_cells))
    X[:, obj.domain] = Z
    return X


def consistency_error(obj, Z):
    err = float(np.abs(Z.sum(axis=0) - obj.p).max()) if obj.consistency else 0.0
    err = max(err, float(-Z.min(initial=0.0)))
    return max(err, obj.infeasibility(Z))


CASES = {
    # level: (children, persons per child, Dirichlet alpha, n parents quick, n parents full)
    "block": (30, 6, 0.02, 5, 20),
    "block_group": (4, 300, 0.03, 3, 10),
    "tract": (30, 600, 0.3, 1, 3),
    # households and every GQ type populated: free set = the full grid (Kronecker x-step)
    "tract_dense": (30, 600, 1.0, 1, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-limit", type=float, default=None, help="per OSQP/Clarabel solve, s")
    args = ap.parse_args()
    limit = args.time_limit or (20.0 if args.quick else 300.0)
    opts = SolveOptions(tol=1e-9)
    rows, violations, large = [], 0, None
    cases = dict(CASES)
    if not args.quick:
        cases["county_3000_tracts"] = (3000, 40, 1.0, 0, 1)
    with threadpool_limits(1, "blas"):
        for level, (k, pop, alpha, nq, nf) in cases.items():
            var_level = "tract" if level.startswith(("county", "tract")) else level
            for seed in range(nq if args.quick else nf):
                prob, _ = random_parent(k=k, pop=pop, seed=100 + seed, alpha=alpha,
                                        variances=production_variances(var_level),
                                        gq=level != "tract_dense")
                if level.startswith("county"):
                    # production path for a huge parent: multipass (pass 2 well conditioned),
                    # tol 1e-6; one run, no reference solver (OSQP/Clarabel cannot finish)
                    t0 = time.perf_counter()
                    try:
                        _, st = solve_parent(prob, SolveOptions(tol=1e-6, multipass=True))
                    except PostprocessError as exc:
                        violations += 1
                        print(f"VIOLATION {level}: {exc}", file=sys.stderr)
                        continue
                    large = dict(level=level, k=k, free=int(prob.free_cells().size),
                                 seconds=time.perf_counter() - t0, iterations=st.iterations,
                                 method=st.method, rel_gap=st.rel_gap, certified=st.certified)
                    print(json.dumps(large), flush=True)
                    continue
                reps = 3
                t_l2, t_full = [], []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    obj, res = ours_l2(prob, opts)
                    t_l2.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    try:
                        solve_parent(prob, opts)
                    except PostprocessError as exc:
                        violations += 1
                        print(f"VIOLATION {level} seed {seed}: {exc}", file=sys.stderr)
                    t_full.append(time.perf_counter() - t0)
                lb = res.f - res.gap  # certified lower bound on f*
                row = dict(level=level, k=k, free=int(prob.free_cells().size),
                           variables=int(obj.allowed.sum()), ours_l2_s=statistics.median(t_l2),
                           ours_full_s=statistics.median(t_full), iterations=res.iterations,
                           method=res.method, certified=res.certified,
                           ours_rel_gap=(res.f - lb) / res.f,
                           ours_consistency_err=consistency_error(obj, res.Z))
                run_ref = obj.allowed.sum() <= 400_000
                if run_ref:
                    qp = lifted_qp(obj)
                    s, Z, status = run_osqp(obj, qp, limit)
                    row.update(osqp_s=s, osqp_status=status)
                    if Z is not None:
                        row["osqp_rel_gap"] = (obj.value(Z) - lb) / res.f
                        row["osqp_consistency_err"] = consistency_error(obj, Z)
                    if obj.allowed.sum() <= 20_000:
                        s, Z, status = run_clarabel(obj, qp, limit)
                        row.update(clarabel_s=s, clarabel_status=status,
                                   clarabel_rel_gap=(obj.value(Z) - lb) / res.f,
                                   clarabel_consistency_err=consistency_error(obj, Z))
                rows.append(row)
                print(json.dumps({k2: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                  for k2, v in row.items()}), flush=True)
    # the block level runs batched in production: time many block-shaped parents together
    nb = 32 if args.quick else 128
    k, pop, alpha, _, _ = CASES["block"]
    probs = [random_parent(k=k, pop=pop, seed=1000 + s, alpha=alpha,
                           variances=production_variances("block"), gq=True)[0] for s in range(nb)]
    with threadpool_limits(1, "blas"):
        t_b = []
        for _ in range(3):
            t0 = time.perf_counter()
            solve_batch(probs, tol=opts.tol)
            t_b.append((time.perf_counter() - t0) / nb)
        cat = lambda f: np.concatenate([f(p) for p in probs])  # noqa: E731
        batch = LevelBatch(probs[0].spec, np.stack([p.parent for p in probs]),
                           np.concatenate([[0], np.cumsum([p.k for p in probs])]),
                           {q: cat(lambda p: p.targets[q]) for q in probs[0].targets},
                           probs[0].variances, lower=cat(lambda p: p.lower),
                           zero_answers=cat(lambda p: p.zero_answers))
        t_lv = []
        for _ in range(3):
            t0 = time.perf_counter()
            _, d = solve_level(batch, opts, level="block")
            t_lv.append((time.perf_counter() - t0) / nb)
        violations += 0  # solve_level raises on any violation
    block_batched_l2 = statistics.median(t_b)
    block_level_s = statistics.median(t_lv)
    print(json.dumps(dict(level="block_batched", parents=nb, l2_s_per_parent=block_batched_l2,
                          level_s_per_parent=block_level_s, methods=d.methods,
                          max_rel_gap=d.max_rel_gap, fallbacks=d.fallbacks)), flush=True)
    for r in rows:
        if r["level"] == "block":
            r["ours_l2_s"] = min(r["ours_l2_s"], block_batched_l2)
    speed = [r["osqp_s"] / r["ours_l2_s"] for r in rows if "osqp_s" in r]
    by_level = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    per_level = {lv: dict(ours_l2_s=statistics.median(x["ours_l2_s"] for x in rs),
                          ours_full_s=statistics.median(x["ours_full_s"] for x in rs),
                          osqp_s=statistics.median(x["osqp_s"] for x in rs) if all("osqp_s" in x for x in rs) else None)
                 for lv, rs in by_level.items()}
    block_s = block_level_s
    summary = dict(
        speedup_vs_osqp=min(speed) if speed else None,
        median_speedup_vs_osqp=statistics.median(speed) if speed else None,
        max_rel_objective_gap=max(max(r["ours_rel_gap"] for r in rows), d.max_rel_gap),
        max_osqp_rel_gap=max((r.get("osqp_rel_gap", 0.0) for r in rows), default=None),
        consistency_violations=violations,
        max_ours_consistency_err=max(r["ours_consistency_err"] for r in rows),
        per_level=per_level,
        block_batched_l2_s_per_parent=block_batched_l2,
        block_level_s_per_parent=block_level_s,
        us_block_level_core_hours=block_s * US_BLOCK_GROUPS / 3600,
        us_block_level_hours_2_cores=block_s * US_BLOCK_GROUPS / 3600 / 2,
        osqp_time_limit_s=limit,
        large_parent=large,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
