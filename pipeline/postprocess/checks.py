"""Post-checks on every solved parent: a violation is a bug and stops the run."""

from __future__ import annotations

import numpy as np

from pipeline.postprocess.problem import ParentProblem, PostprocessError


def verify_children(
    prob: ParentProblem,
    N: np.ndarray,
    allowed: np.ndarray,
    lower: np.ndarray | None,
) -> None:
    """Assert integrality, non-negativity, parent sums, zeros, exact totals and lower bounds.

    ``N``: children (k, n_cells); ``allowed``/``lower``: the effective constraints (after any
    documented relaxation). Raises :class:`PostprocessError` naming the parent.
    """
    spec = prob.spec
    where = f"parent {prob.label!r}"
    if N.shape != (prob.k, spec.n_cells):
        raise PostprocessError(f"{where}: result shape {N.shape} != {(prob.k, spec.n_cells)}")
    if not np.issubdtype(N.dtype, np.integer):
        raise PostprocessError(f"{where}: result is not integer ({N.dtype})")
    if (N < 0).any():
        raise PostprocessError(f"{where}: negative counts in {int((N < 0).sum())} entries")
    if prob.has_parent:
        diff = N.sum(axis=0) - np.asarray(prob.parent, dtype=np.int64)
        if prob.k and (diff != 0).any():
            bad = np.nonzero(diff)[0]
            raise PostprocessError(f"{where}: children do not sum to the parent on cells {bad[:10]}")
    if (N[~allowed] != 0).any():
        raise PostprocessError(f"{where}: non-zero counts in structurally zero cells")
    if prob.totals is not None:
        bad = np.nonzero(N.sum(axis=1) != np.asarray(prob.totals))[0]
        if bad.size:
            raise PostprocessError(f"{where}: exact child totals violated for children {bad[:10]}")
    if lower is not None:
        G = prob.spec.query(prob.bound_query).answer(N)
        bad = np.nonzero((G < lower).any(axis=1))[0]
        if bad.size:
            raise PostprocessError(f"{where}: lower bounds violated for children {bad[:10]}")
