"""Query answers: the bincount path equals the 0/1 query matrix, keeps dtypes, stays exact."""

import numpy as np
import pytest

from pipeline.model.spec import load_spec

PL94 = load_spec("pl94")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float64, bool])
def test_answers_equal_the_query_matrix_and_keep_the_dtype(dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (3, 5, PL94.n_cells)).astype(dtype)
    for name in PL94.query_names:
        q = PL94.query(name)
        got = q.answer(x)
        ref = (x.reshape(-1, PL94.n_cells).astype(np.float64) @ q.matrix().T.toarray())
        ref = ref.reshape(3, 5, q.n_answers)
        assert got.dtype == x.dtype and got.shape == (3, 5, q.n_answers)
        if dtype is bool:  # a sum of booleans is their "or"
            np.testing.assert_array_equal(got, ref > 0)
        else:
            np.testing.assert_array_equal(got, ref.astype(dtype))


def test_integer_answers_beyond_float_precision_are_exact():
    # counts whose sums exceed 2^53 take the integer path: no float rounding
    x = np.zeros((1, PL94.n_cells), dtype=np.int64)
    x[0, :3] = 2**60
    x[0, 3] = 1
    total = PL94.query("total").answer(x)
    assert total[0, 0] == 3 * 2**60 + 1


@pytest.mark.parametrize("spec", ["pl94", "units"])
def test_float_answers_are_bitwise_the_cell_order_sums(spec):
    """Float answers (one sparse product, :meth:`Query.answer_columns`) are bit for bit the sums
    over each answer's cells in cell order from 0.0 — what a ``bincount`` over (row, answer) ids
    gives, the order the GLS targets were always summed in — signed zeros, NaN and infinities
    included, whether the histograms come as rows (``answer``) or as columns."""
    s = load_spec(spec)
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1e3, (40, s.n_cells)) * 10.0 ** rng.integers(-12, 12, (40, s.n_cells))
    x[rng.random(x.shape) < 0.3] = -0.0
    x[rng.random(x.shape) < 0.2] = 0.0
    x[0, :5] = -0.0  # answers whose cells are all -0.0 sum to +0.0
    x[1, rng.integers(0, s.n_cells, 3)] = [np.nan, np.inf, -np.inf]
    x[2, :2] = [np.inf, -np.inf]
    for name in s.query_names:
        q = s.query(name)
        idx = (np.arange(x.shape[0])[:, None] * q.n_answers + q.cell_to_answer[None, :]).ravel()
        ref = np.bincount(idx, weights=x.ravel(), minlength=x.shape[0] * q.n_answers).reshape(-1, q.n_answers)
        got = q.answer(x)
        assert got.dtype == np.float64 and got.shape == ref.shape
        assert np.array_equal(got.view(np.int64), ref.view(np.int64)), name  # the same bits
        cols = q.answer_columns(np.ascontiguousarray(x.T))
        assert np.array_equal(np.ascontiguousarray(cols.T).view(np.int64), ref.view(np.int64)), name
    assert np.signbit(s.query(s.query_names[0]).answer(np.full((1, s.n_cells), -0.0))).sum() == 0
