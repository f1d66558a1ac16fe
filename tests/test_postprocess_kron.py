"""Structured inverse against the dense normal matrix, query algebra against sparse matrices."""

import numpy as np
import pytest

from pipeline.postprocess.kron import KronInverse
from pipeline.postprocess.operators import QuerySystem, dense_normal_matrix
from pipeline.spec import load_spec

PL94 = load_spec("pl94")


def _weights(spec, seed):
    rng = np.random.default_rng(seed)
    return {q: float(rng.uniform(0.1, 3.0)) for q in spec.query_names}


@pytest.mark.parametrize("seed", [0])
def test_kron_inverse_matches_dense(seed):
    w = _weights(PL94, seed)
    sysall = QuerySystem(PL94, np.arange(PL94.n_cells), tuple(w))
    H = dense_normal_matrix(sysall, {q: np.full(sysall.terms[q].n_local, wq) for q, wq in w.items()})
    # dense H against the sparse query matrices
    Href = sum(wq * (PL94.query(q).matrix().T @ PL94.query(q).matrix()).toarray() for q, wq in w.items())
    np.testing.assert_allclose(H, Href, atol=1e-12)
    kron = KronInverse(PL94, w)
    ev = np.linalg.eigvalsh(H)
    lo, hi = kron.eig_range()
    assert abs(lo - ev.min()) < 1e-9 * ev.max() and abs(hi - ev.max()) < 1e-9 * ev.max()
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3, PL94.n_cells))
    for rho in (0.05, 7.0):
        kron.set_rho(rho)
        Y = kron.apply(X)
        np.testing.assert_allclose(Y @ (H + rho * np.eye(PL94.n_cells)), X, atol=1e-9)
    # extra weight on a query (ADMM splitting of hhgq bounds)
    kron.set_rho(2.0, {"hhgq": 2.0})
    G = PL94.query("hhgq").matrix().toarray()
    M = H + 2.0 * np.eye(PL94.n_cells) + 2.0 * G.T @ G
    np.testing.assert_allclose(kron.apply(X) @ M, X, atol=1e-9)


def test_kron_units_spec():
    spec = load_spec("units")
    w = {"total": 2.0, "detailed": 0.5}
    k = KronInverse(spec, w)
    H = 2.0 * np.ones((2, 2)) + 0.5 * np.eye(2)
    k.set_rho(1.0)
    X = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(k.apply(X) @ (H + np.eye(2)), X, atol=1e-12)


def test_query_system_answers_match_spec():
    rng = np.random.default_rng(2)
    dom = np.sort(rng.choice(PL94.n_cells, 300, replace=False))
    s = QuerySystem(PL94, dom, PL94.query_names)
    X = rng.random((4, dom.size))
    full = np.zeros((4, PL94.n_cells))
    full[:, dom] = X
    for q in PL94.query_names:
        ref = PL94.query(q).answer(full)[:, s.terms[q].answers]
        np.testing.assert_allclose(s.answer(q, X), ref, atol=1e-12)
        A = rng.random((4, s.terms[q].n_local))
        # <Q x, a> = <x, Q^T a>
        np.testing.assert_allclose(np.sum(s.answer(q, X) * A), np.sum(X * s.back(q, A)))
