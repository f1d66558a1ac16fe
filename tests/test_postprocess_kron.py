"""Structured inverse against the dense normal matrix, query algebra against sparse matrices."""

import numpy as np
import pytest

from pipeline.model.spec import load_spec
from pipeline.postprocess.kron import KronInverse
from pipeline.postprocess.operators import QuerySystem, dense_normal_matrix

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


def test_kron_inverse_dense_axis_not_first_and_out_buffer():
    # a recode on the middle axis makes it the dense one: the apply permutes axes; ``out`` is
    # filled in place; several queries of each kind (I, J, recode) on each axis
    from pipeline.model.spec import Attribute, HistogramSpec, Recode

    spec = HistogramSpec(
        name="toy-mid-dense",
        attributes=(Attribute("a", (0, 1, 2), ("a0", "a1", "a2")),
                    Attribute("b", (0, 1, 2, 3), ("b0", "b1", "b2", "b3")),
                    Attribute("c", (0, 1), ("c0", "c1"))),
        recodes={"bg": Recode("bg", "b", ((0, 1), (2, 3)), ("lo", "hi"))},
        query_defs={"total": (), "bg": ("bg",), "a*bg": ("a", "bg"), "c": ("c",),
                    "a*c": ("a", "c"), "detailed": ("a", "b", "c")},
        rounder_chain=("total", "detailed"),
        structural_zero_defs=(),
    )
    w = {"total": 0.7, "bg": 1.3, "a*bg": 0.4, "c": 2.0, "a*c": 0.9, "detailed": 0.5}
    kron = KronInverse(spec, w)
    assert kron.dense == [1] and kron.perm != (0, 1, 2)
    sysall = QuerySystem(spec, np.arange(spec.n_cells), tuple(w))
    H = dense_normal_matrix(sysall, {q: np.full(sysall.terms[q].n_local, wq) for q, wq in w.items()})
    X = np.random.default_rng(3).normal(size=(5, spec.n_cells))
    kron.set_rho(0.3, {"bg": 0.3})
    G = spec.query("bg").matrix().toarray()
    M = H + 0.3 * np.eye(spec.n_cells) + 0.3 * G.T @ G
    out = np.full_like(X, np.nan)
    Y = kron.apply(X, out=out)
    assert Y is out
    np.testing.assert_allclose(Y @ M, X, atol=1e-10)
    np.testing.assert_allclose(kron.apply(X), Y, atol=1e-13)


def test_kron_apply_out_buffer_pl94_matches_allocating_apply():
    kron = KronInverse(PL94, _weights(PL94, 4))
    kron.set_rho(1.7)
    X = np.random.default_rng(4).normal(size=(7, PL94.n_cells))
    out = np.full_like(X, np.nan)
    Y = kron.apply(X, out=out)
    assert Y is out or np.shares_memory(Y, out)
    np.testing.assert_array_equal(Y, kron.apply(X))


def test_kron_forward_is_the_normal_matrix():
    w = _weights(PL94, 5)
    sysall = QuerySystem(PL94, np.arange(PL94.n_cells), tuple(w))
    H = dense_normal_matrix(sysall, {q: np.full(sysall.terms[q].n_local, wq) for q, wq in w.items()})
    kron = KronInverse(PL94, w)
    X = np.random.default_rng(5).normal(size=(4, PL94.n_cells))
    np.testing.assert_allclose(kron.forward(X), X @ H, atol=1e-10)
    kron.set_rho(0.9)  # the forward operator ignores rho
    np.testing.assert_allclose(kron.forward(X), X @ H, atol=1e-10)
