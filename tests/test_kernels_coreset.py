import numpy as np
import pytest

from anomax.errors import InputError
from anomax.kernels.coreset import greedy_coreset


def numpy_greedy(x, size, start):
    chosen = [start]
    nearest = np.full(len(x), np.inf)
    for _ in range(size - 1):
        nearest = np.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(nearest)))
    return chosen


@pytest.mark.parametrize("start", [0, 123])
def test_coreset_is_the_greedy_k_center_selection(start):
    x = np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32)
    selection = np.asarray(greedy_coreset(x, 40, start))
    assert selection.tolist() == numpy_greedy(x.astype(np.float64), 40, start)
    assert len(set(selection.tolist())) == 40


def test_coreset_of_the_whole_set_is_a_permutation():
    x = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32)
    assert sorted(np.asarray(greedy_coreset(x, 20, 5)).tolist()) == list(range(20))


def test_coreset_larger_than_the_data_is_refused():
    with pytest.raises(InputError, match="number of rows"):
        greedy_coreset(np.zeros((3, 2), np.float32), 4)
