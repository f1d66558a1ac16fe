"""Controlled rounding of one parent's least-squares solution to non-negative integers.

Minimise the L1 distance to the real solution on every answer of the nested rounder chain
(e.g. total > hhgq > hhgq*hispanic > hhgq*hispanic*cenrace > detailed) subject to exact
per-cell parent sums, exact child totals (invariants), lower bounds on one chain query, and
every chain answer within [floor, ceil] of its real value. The per-child chain is a laminar
family and the per-cell sums another, so the constraint matrix is a network matrix (totally
unimodular): a basic optimal solution of the LP (HiGHS dual simplex) is integral, no integer
solver needed. Each chain answer ``n = base + sum_s d_s`` with unit segments ``d_s`` whose
costs are the secant slopes of ``|n - a|`` (convex, so segments fill in order).

The detailed-only case (no chain above the cells, no totals, no bounds) separates by cell and
is solved exactly by largest remainder.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from pipeline.model.spec import HistogramSpec
from pipeline.postprocess.problem import PostprocessError

try:  # OR-Tools network simplex: the exact min-cost flow, much faster than a general LP
    from ortools.graph.python import min_cost_flow
except ImportError:  # pragma: no cover - optional speed-up, the LP gives the same optimum
    min_cost_flow = None

SNAP = 1e-6  # real answers this close to an integer are treated as that integer
COST_SCALE = 1e9  # integer arc costs for the flow solver (secant slopes are in [-1, 1])


def _flow(parent_node: np.ndarray, base: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray,
          seg_cost: np.ndarray, leaf0: int, leaf_cell: np.ndarray,
          p_cells: np.ndarray) -> np.ndarray:
    """The same rounding as a min-cost flow: source -> level-0 chain nodes -> ... -> leaves ->
    parent cells (demand p). Each chain node's inflow is ``base + sum_s d_s``: the base and the
    segment lower bounds are pre-routed (supply adjustments), each segment is a parallel arc
    of capacity ``hi - lo`` and integer cost ``round(COST_SCALE * c)``. Returns ``sum_s d_s``
    per chain node (integers)."""
    n_nodes = seg_hi.shape[0]
    n_cells = p_cells.size
    src = 0
    node_id = 1 + np.arange(n_nodes)
    tail_of = np.where(parent_node >= 0, parent_node + 1, src)
    cell_id = 1 + n_nodes + np.arange(n_cells)
    supply = np.zeros(1 + n_nodes + n_cells, dtype=np.int64)
    supply[src] = int(p_cells.sum())
    np.subtract.at(supply, cell_id, p_cells)
    fixed = (base + seg_lo.sum(axis=1)).astype(np.int64)  # pre-routed flow on each node's arc
    np.subtract.at(supply, tail_of, fixed)
    np.add.at(supply, node_id, fixed)
    cap = (seg_hi - seg_lo).astype(np.int64)
    v_node, v_seg = np.nonzero(cap > 0)
    tails = np.concatenate([tail_of[v_node], node_id[leaf0:]])
    heads = np.concatenate([node_id[v_node], cell_id[leaf_cell]])
    caps = np.concatenate([cap[v_node, v_seg], np.full(n_nodes - leaf0, int(p_cells.sum()))])
    costs = np.concatenate([np.rint(COST_SCALE * seg_cost[v_node, v_seg]).astype(np.int64),
                            np.zeros(n_nodes - leaf0, dtype=np.int64)])
    mcf = min_cost_flow.SimpleMinCostFlow()
    arcs = mcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
    mcf.set_nodes_supplies(np.arange(supply.size), supply)
    status = mcf.solve()
    if status != mcf.OPTIMAL:
        raise PostprocessError(f"rounding flow infeasible (status {status})")
    flows = mcf.flows(arcs[: v_node.size])
    d = seg_lo.sum(axis=1).copy()
    np.add.at(d, v_node, flows)
    return d


def largest_remainder(X: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Round ``X`` (k, n), column sums ``p`` (n,) int, to integers with exact column sums.

    Floors every entry and gives the +1s of each column to the largest fractional parts;
    ties go to the lower child index (stable sort), so the result is deterministic. This is
    exactly L1-optimal per cell. Returns int64 (k, n).
    """
    X = np.maximum(np.asarray(X, dtype=np.float64), 0.0)
    k, n = X.shape
    F = np.floor(X + SNAP)
    frac = np.where(X - F > 0, X - F, 0.0)
    R = np.asarray(p, dtype=np.int64) - F.sum(axis=0).astype(np.int64)
    if (R < 0).any() or (R > k).any():
        raise PostprocessError("largest remainder: column sums of X are not within 1 of p")
    order = np.argsort(-frac, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[:, None].repeat(n, axis=1), axis=0)
    return F.astype(np.int64) + (rank < R[None, :])


_CHAIN_CACHE: dict[tuple, list[np.ndarray]] = {}


def _chain_levels(spec: HistogramSpec, chain: tuple[str, ...], with_total: bool) -> list[np.ndarray]:
    """cell -> answer arrays for each chain level (cells level last), checking nesting once."""
    key = (id(spec), spec.name, tuple(chain), with_total)
    if key not in _CHAIN_CACHE:
        _CHAIN_CACHE[key] = _build_chain_levels(spec, chain, with_total)
    return _CHAIN_CACHE[key]


def _build_chain_levels(spec: HistogramSpec, chain: tuple[str, ...], with_total: bool) -> list[np.ndarray]:
    names = list(chain)
    if with_total and "total" not in names:
        names.insert(0, "total")
    maps = [spec.query(q).cell_to_answer for q in names]
    if not names or spec.query(names[-1]).n_answers != spec.n_cells:
        maps.append(np.arange(spec.n_cells))
    for a, b in itertools.pairwise(maps):
        pairs = np.unique(np.stack([b, a]), axis=1)
        if np.unique(pairs[0]).size != pairs.shape[1]:
            raise PostprocessError(f"rounder chain {chain} is not nested")
    return maps


def controlled_round(
    spec: HistogramSpec,
    X: np.ndarray,
    parent: np.ndarray | None,
    allowed: np.ndarray,
    chain: tuple[str, ...],
    totals: np.ndarray | None = None,
    lower: np.ndarray | None = None,
    bound_query: str = "hhgq",
    widen: bool = False,
    method: str = "auto",
) -> np.ndarray:
    """Integer children ``(k, n_cells)`` int64 from the real solution ``X`` (k, n_cells).

    ``parent``: int ``(n_cells,)`` per-cell sums to meet exactly (None at the root);
    ``allowed``: bool (k, n_cells); ``totals``: exact integer child totals or None;
    ``lower``: lower bounds ``(k, n_answers(bound_query))`` (must be a chain query).
    ``widen``: allow every answer one unit beyond [floor, ceil] (the fallback when the
    real solution only meets constraints to a tolerance). ``method``: "flow" (OR-Tools
    network simplex), "lp" (HiGHS dual simplex) or "auto" (flow with a parent if OR-Tools is
    installed, else LP); both return an optimal vertex. Raises PostprocessError when
    the LP is infeasible or returns a non-integral point.
    """
    Xf = np.asarray(X, dtype=np.float64)
    k, n = Xf.shape
    maps = _chain_levels(spec, chain, totals is not None)
    sizes = [int(m.max()) + 1 for m in maps]  # answers per level (node keys: child * size + answer)
    if lower is not None and bound_query not in chain:
        raise PostprocessError(f"lower bounds on {bound_query!r} need it in the rounder chain")
    if parent is not None:
        # nodes come only from cells with a parent count (live leaves) or real mass (values):
        # work on those columns, usually a few percent of the grid; the keys, nodes and flow
        # are the same as on the full grid
        on = np.flatnonzero((np.asarray(parent) > 0) | (Xf > 0).any(axis=0))
        Xf, allowed = Xf[:, on], allowed[:, on]
        maps = [m[on] for m in maps]
    X = np.where(allowed, np.maximum(Xf, 0.0), 0.0)
    live = allowed & (X > SNAP) if not widen else allowed.copy()
    if parent is not None:
        live &= (np.asarray(parent)[on] > 0)[None, :]
    lc, lj = np.nonzero(live)
    nodes_of_leaf = []
    node_off = [0]
    level_keys = []
    for m, na in zip(maps, sizes):
        keys, inv = np.unique(lc * na + m[lj], return_inverse=True)
        nodes_of_leaf.append(node_off[-1] + inv.ravel())
        level_keys.append((keys, na))
        node_off.append(node_off[-1] + keys.size)
    n_nodes = node_off[-1]
    value = np.zeros(n_nodes)
    child_of_node = np.zeros(n_nodes, dtype=np.int64)
    ans_of_node = np.zeros(n_nodes, dtype=np.int64)
    level_of_node = np.zeros(n_nodes, dtype=np.int64)
    parent_node = np.full(n_nodes, -1, dtype=np.int64)
    ec, ej = np.nonzero(X > 0)  # the mass to aggregate (X is 0 elsewhere)
    ex = X[ec, ej]
    for li, (keys, na) in enumerate(level_keys):
        sl = slice(node_off[li], node_off[li + 1])
        child_of_node[sl] = keys // na
        ans_of_node[sl] = keys % na
        level_of_node[sl] = li
        # value includes the (tiny) mass of non-live cells of the answer; mass of answers
        # without a live cell has no node (those answers round to 0)
        ekey = ec * na + maps[li][ej]
        pos = np.minimum(np.searchsorted(keys, ekey), max(keys.size - 1, 0))
        hit = keys[pos] == ekey if keys.size else np.zeros(ekey.size, dtype=bool)
        value[sl] = np.bincount(pos[hit], weights=ex[hit], minlength=keys.size)
        if li > 0:
            parent_node[nodes_of_leaf[li]] = nodes_of_leaf[li - 1]
    # segments: n = base + sum_s d_s, d_s in [lo_s, hi_s], cost c_s
    r = np.rint(value)
    snapped = np.abs(value - r) <= SNAP
    fl = np.where(snapped, r, np.floor(value))
    frac = np.where(snapped, 0.0, value - fl)
    mid_cost = 1.0 - 2.0 * frac
    if widen:
        base = np.maximum(fl - 1, 0)
        # segments fl-1 -> fl (slope -1), fl -> fl+1 (secant slope), fl+1 -> fl+2 (slope +1)
        seg_cost = np.stack([np.full(n_nodes, -1.0), mid_cost, np.ones(n_nodes)], axis=1)
        seg_hi = np.stack([(fl >= 1).astype(float), np.ones(n_nodes), np.ones(n_nodes)], axis=1)
    else:
        base = fl
        seg_cost = mid_cost[:, None]
        seg_hi = np.where(snapped, 0.0, 1.0)[:, None]
    seg_lo = np.zeros_like(seg_hi)
    need = np.zeros(n_nodes)
    if lower is not None:
        bi = _names(chain, totals).index(bound_query)
        sl = slice(node_off[bi], node_off[bi + 1])
        L = np.asarray(lower, dtype=np.float64)[child_of_node[sl], ans_of_node[sl]]
        need[sl] = np.maximum(L - base[sl], 0.0)
    if totals is not None:
        sl = slice(node_off[0], node_off[1])
        base[sl] = np.asarray(totals, dtype=np.float64)[child_of_node[sl]]
        seg_hi[sl] = 0.0
        need[sl] = 0.0
    # force the cheapest-first segments to cover lower bounds (convex costs fill in order)
    ns = seg_hi.shape[1]
    for s in range(ns):
        take = np.minimum(need, seg_hi[:, s])
        seg_lo[:, s] = np.maximum(seg_lo[:, s], take)
        need -= take
    if (need > 0).any() and not widen:
        raise PostprocessError("rounding: a lower bound lies above ceil of its real answer")
    leaf0 = node_off[-2]
    pflat = cells = leaf_cell_idx = None
    if parent is not None:
        pflat = np.asarray(parent).ravel()
        cells = np.nonzero(pflat > 0)[0]
        cell_pos = np.full(pflat.size, -1, dtype=np.int64)
        cell_pos[cells] = np.arange(cells.size)
        leaf_cell = ans_of_node[leaf0:]
        leaf_cell_idx = cell_pos[leaf_cell]
        if method == "flow" or (method == "auto" and min_cost_flow is not None):
            d = _flow(parent_node, base, seg_lo, seg_hi, seg_cost, leaf0, leaf_cell_idx,
                      pflat[cells].astype(np.int64))
            N = np.zeros((k, n), dtype=np.int64)
            N[child_of_node[leaf0:], ans_of_node[leaf0:]] = (base + d)[leaf0:].astype(np.int64)
            return N
    # the LP: one row per node that has children (n_P - sum n_children = 0) + one per cell
    nv = n_nodes * ns
    var_node = np.repeat(np.arange(n_nodes), ns)
    rows, cols, vals = [], [], []
    has_kids = np.zeros(n_nodes, dtype=bool)
    has_kids[parent_node[parent_node >= 0]] = True
    row_of_node = np.full(n_nodes, -1, dtype=np.int64)
    row_of_node[has_kids] = np.arange(int(has_kids.sum()))
    n_rows = int(has_kids.sum())
    rhs = np.zeros(n_rows)
    own = row_of_node[var_node] >= 0
    rows.append(row_of_node[var_node][own])
    cols.append(np.nonzero(own)[0])
    vals.append(np.ones(own.sum()))
    par = parent_node[var_node]
    up = par >= 0
    rows.append(row_of_node[par[up]])
    cols.append(np.nonzero(up)[0])
    vals.append(-np.ones(up.sum()))
    np.add.at(rhs, row_of_node[parent_node[parent_node >= 0]], base[parent_node >= 0])
    rhs[row_of_node[has_kids]] -= base[has_kids]
    if parent is not None:
        assert pflat is not None and cells is not None and leaf_cell_idx is not None
        vleaf = var_node >= leaf0
        rows.append(n_rows + leaf_cell_idx[var_node[vleaf] - leaf0])
        cols.append(np.nonzero(vleaf)[0])
        vals.append(np.ones(vleaf.sum()))
        crhs = pflat.astype(np.float64)[cells]
        np.subtract.at(crhs, leaf_cell_idx, base[leaf0:])
        rhs = np.concatenate([rhs, crhs])
        n_rows += cells.size
    A = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, nv)
    )
    N = np.zeros((k, n), dtype=np.int64)
    if nv == 0:
        if np.any(rhs != 0):
            raise PostprocessError("rounding: nothing to round but parent cells are non-zero")
        return N
    res = scipy.optimize.linprog(
        seg_cost.ravel(), A_eq=A, b_eq=rhs,
        bounds=np.stack([seg_lo.ravel(), seg_hi.ravel()], axis=1), method="highs-ds",
    )
    if res.status != 0:
        raise PostprocessError(f"rounding LP failed: {res.message}")
    d = res.x.reshape(n_nodes, ns).sum(axis=1)
    di = np.rint(d)
    if np.abs(d - di).max(initial=0.0) > 1e-6:
        raise PostprocessError("rounding LP returned a non-integral vertex")
    nleaf = (base + di)[leaf0:].astype(np.int64)
    N[child_of_node[leaf0:], ans_of_node[leaf0:]] = nleaf
    return N


def _names(chain: tuple[str, ...], totals: np.ndarray | None) -> list[str]:
    names = list(chain)
    if totals is not None and "total" not in names:
        names.insert(0, "total")
    return names
