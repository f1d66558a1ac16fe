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
