import numpy as np
import pytest

from anomax.errors import InputError
from anomax.kernels.neighbors import nearest_neighbors


def brute_force(queries, bank, k):
    d = np.sqrt(((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_search_equals_brute_force(k):
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((37, 5)).astype(np.float32)  # 37 rows: not a multiple of the chunk
    queries = rng.standard_normal((23, 5)).astype(np.float32)
    queries[0] = bank[36]  # nearest to the last real row, right next to the padding
    distances, indices = nearest_neighbors(queries, bank, k=k, chunk_size=8)
    expected_d, expected_i = brute_force(queries, bank, k)
    np.testing.assert_array_equal(np.asarray(indices), expected_i)
    np.testing.assert_allclose(np.asarray(distances), expected_d, atol=1e-4)
    assert np.asarray(indices).max() < len(bank)


@pytest.mark.parametrize("k", [1, 3])
def test_distances_alone_are_the_same_and_need_no_arg_min(k):
    import jax

    rng = np.random.default_rng(2)
    bank = rng.standard_normal((37, 5)).astype(np.float32)
    queries = rng.standard_normal((23, 5)).astype(np.float32)
    distances, _ = nearest_neighbors(queries, bank, k=k, chunk_size=8)
    alone, none = nearest_neighbors(queries, bank, k=k, chunk_size=8, indices=False)
    assert none is None
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(distances))
    if k == 1:
        jaxpr = str(jax.make_jaxpr(lambda q, b: nearest_neighbors(q, b, k=1, chunk_size=8, indices=False))(queries, bank))
        assert "argmin" not in jaxpr and "reduce_min" in jaxpr


def test_padding_never_wins_even_for_a_query_at_the_origin():
    # Padded bank rows are zeros; a query at 0 must still get a real row.
    bank = np.full((5, 3), 10.0, np.float32)
    distances, indices = nearest_neighbors(np.zeros((1, 3), np.float32), bank, k=1, chunk_size=4)
    assert int(indices[0, 0]) < 5 and np.isclose(float(distances[0, 0]), np.sqrt(300.0))


def test_k_larger_than_bank_is_refused():
    with pytest.raises(InputError, match="bank size"):
        nearest_neighbors(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), k=3)


@pytest.mark.parametrize("rows, k, chunk_size", [(11, 9, 10), (5, 4, 4), (7, 7, 1)])
def test_bank_tiles_narrower_than_k_still_give_the_k_nearest(rows, k, chunk_size):
    """A chunk_size that splits the bank into tiles of fewer than k rows used to make top_k fail."""
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((rows, 3)).astype(np.float32)
    queries = rng.standard_normal((6, 3)).astype(np.float32)
    distances, indices = nearest_neighbors(queries, bank, k=k, chunk_size=chunk_size)
    expected_d, expected_i = brute_force(queries, bank, k)
    np.testing.assert_allclose(distances, expected_d, atol=1e-5)
    np.testing.assert_array_equal(indices, expected_i)
