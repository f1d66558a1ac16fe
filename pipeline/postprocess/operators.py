"""Marginal-query algebra on a set of cells: answers, back-projections and the normal matrix.

Every query of a spec is a partition of the cells, so on a *domain* (a subset of cell ids,
usually a parent's free cells) the query matrix restricted to the domain is a 0/1 matrix with
one 1 per column. ``QuerySystem`` holds, per query, the compressed answer id of every domain
cell; applying ``Q`` is a segment sum and ``Q^T`` a gather. The normal matrix is
``H = sum_q w_q Q_q^T diag(m_q) Q_q`` with per-answer weights ``w_q m_q`` (``m_q = 0`` where an
answer is not measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.model.spec import HistogramSpec


@dataclass(frozen=True)
class QueryTerm:
    """One query restricted to a domain: ``ans[i]`` = compressed answer of domain cell i.

    ``answers`` maps compressed answers back to the query's answer ids (``(n_local,)``).
    """

    name: str
    ans: np.ndarray
    answers: np.ndarray

    @property
    def n_local(self) -> int:
        return int(self.answers.size)


class QuerySystem:
    """The queries of a spec restricted to ``domain`` (int64 cell ids, sorted)."""

    def __init__(self, spec: HistogramSpec, domain: np.ndarray, names: tuple[str, ...]):
        self.spec = spec
        self.domain = np.asarray(domain, dtype=np.int64)
        self.terms: dict[str, QueryTerm] = {}
        for n in names:
            q = spec.query(n)
            c2a = q.cell_to_answer[self.domain]
            # compress answer ids by a mark-and-count table: O(n_answers), no sort
            mark = np.zeros(q.n_answers, dtype=bool)
            mark[c2a] = True
            lut = np.cumsum(mark, dtype=np.int64) - 1
            self.terms[n] = QueryTerm(n, lut[c2a], np.flatnonzero(mark).astype(np.int64))

    @property
    def n(self) -> int:
        return int(self.domain.size)

    def answer(self, name: str, X: np.ndarray) -> np.ndarray:
        """``Q X`` for ``X`` (k, n) -> (k, n_local) (sums over the domain cells of each answer)."""
        t = self.terms[name]
        k = X.shape[0]
        idx = (np.arange(k, dtype=np.int64)[:, None] * t.n_local + t.ans[None, :]).ravel()
        return np.bincount(idx, weights=X.ravel(), minlength=k * t.n_local).reshape(k, t.n_local)

    def back(self, name: str, A: np.ndarray) -> np.ndarray:
        """``Q^T A`` for ``A`` (k, n_local) -> (k, n)."""
        return A[:, self.terms[name].ans]

    def local_targets(
        self, name: str, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Split full targets ``y`` (k, n_answers) into the domain part and a constant.

        Returns ``(y_local (k, n_local) with NaN -> 0, measured mask (k, n_local) bool,
        sum of y^2 over measured answers that have no domain cell)``: off-domain answers have
        ``Q x = 0``, so their terms are the constant ``y^2``.
        """
        t = self.terms[name]
        y = np.asarray(y, dtype=np.float64)
        yl = y[:, t.answers]
        m = np.isfinite(yl)
        yl = np.where(m, yl, 0.0)
        # off-domain part = all measured answers minus the domain's (no gather of the rest)
        ya = np.where(np.isfinite(y), y, 0.0).ravel()
        ylr = yl.ravel()
        const = max(float(np.einsum("i,i->", ya, ya)) - float(np.einsum("i,i->", ylr, ylr)), 0.0)
        return yl, m, const


def dense_normal_matrix(
    system: QuerySystem, weights: dict[str, np.ndarray]
) -> np.ndarray:
    """Dense ``H_DD = sum_q Q_q^T diag(w_q) Q_q`` (n, n) for per-answer weights ``(n_local,)``."""
    n = system.n
    H = np.zeros((n, n))
    for name, w in weights.items():
        ans = system.terms[name].ans
        same = ans[:, None] == ans[None, :]
        H += np.where(same, w[ans][:, None], 0.0)
    return H
