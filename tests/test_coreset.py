# tests/test_coreset.py
import numpy as np
import pytest
import torch

from defectvad.components.k_center_greedy import KCenterGreedy, select_k_centers
from defectvad.components.nearest_neighbors import nearest_neighbors
from defectvad.components.sparse_random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim
from defectvad.errors import ConfigError


def naive_k_centers(features, count, start):
    # the textbook loop, as anomalib writes it: norms of differences, running minimum, first index on ties
    min_distances = torch.full((features.shape[0],), float("inf"))
    picks = [start]
    for _ in range(count - 1):
        distances = torch.linalg.norm(features - features[picks[-1]], dim=1)
        min_distances = torch.minimum(min_distances, distances)
        index = int(torch.argmax(min_distances))
        min_distances[index] = 0
        picks.append(index)
    return picks


def test_points_on_a_line_pick_the_farthest_each_time():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # from 0: 10 is farthest; then 3 (3 from 0, 7 from 10); then 1 and 2 tie at 1, the first wins
    assert select_k_centers(points, 4, 0) == [0, 4, 3, 1]
    assert select_k_centers(points, 5, 4) == [4, 0, 3, 1, 2]


def test_square_corners_tie_to_the_first_index():
    points = torch.tensor([[0.0, 0.0], [1, 1], [-1, -1], [1, -1], [-1, 1], [0.5, 0]])
    # every corner is sqrt(2) from the centre; then (-1,-1) is farthest from (1,1), and so on
    assert select_k_centers(points, 4, 0) == [0, 1, 2, 3]
    assert select_k_centers(points, 6, 0, block_size=2) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("block_size", [None, 7, 64, 500])
def test_selection_equals_the_naive_loop(block_size):
    features = torch.randn(500, 12, generator=torch.Generator().manual_seed(3))
    expected = naive_k_centers(features, 60, 17)
    threads = torch.get_num_threads()
    assert select_k_centers(features, 60, 17, block_size=block_size) == expected
    assert torch.get_num_threads() == threads


def test_selection_with_duplicates_and_clusters_equals_the_naive_loop():
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(5, 8, generator=generator) * 10
    features = centres[torch.randint(0, 5, (400,), generator=generator)] + 0.01 * torch.randn(400, 8, generator=generator)
    features[::7] = features[0]
    assert select_k_centers(features, 80, 3, block_size=32) == naive_k_centers(features, 80, 3)


def test_johnson_lindenstrauss_dimension():
    # 4 ln(n) / (eps^2/2 - eps^3/3), truncated: 4 ln(102400) / 0.162 = 284.9
    assert johnson_lindenstrauss_min_dim(102400, eps=0.9) == 284
    assert johnson_lindenstrauss_min_dim(1000, eps=0.1) == 5920


def test_sparse_projection_is_seeded_and_sparse():
    embedding = torch.randn(300, 100)
    matrices = []
    for _ in range(2):
        torch.manual_seed(5)
        np.random.seed(5)
        matrices.append(SparseRandomProjection(eps=0.9).fit(embedding).sparse_random_matrix)
    assert torch.equal(matrices[0], matrices[1])
    matrix = matrices[0]
    assert matrix.shape == (johnson_lindenstrauss_min_dim(300, 0.9), 100)
    # non-zeros are +-sqrt(1/density)/sqrt(n_components) with density 1/sqrt(100) = 0.1
    values = matrix[matrix != 0].abs()
    assert torch.allclose(values, torch.full_like(values, (10 / matrix.shape[0]) ** 0.5))
    assert 0.05 < (matrix != 0).float().mean() < 0.15


def test_k_center_greedy_keeps_the_ratio_and_accepts_a_given_projection():
    embedding = torch.randn(400, 32, generator=torch.Generator().manual_seed(6))
    sampler = KCenterGreedy(embedding, 0.1, progress_bar=False)
    coreset = sampler.sample_coreset()
    assert coreset.shape == (40, 32)
    projected = torch.randn(400, 5, generator=torch.Generator().manual_seed(7))
    indices = KCenterGreedy(embedding, 0.1).select_coreset_idxs(projected, start_index=11)
    assert indices == naive_k_centers(projected, 40, 11)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1])
def test_bad_sampling_ratio_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match="coreset_sampling_ratio"):
        KCenterGreedy(torch.randn(10, 4), ratio)


def test_ratio_that_keeps_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="keeps none"):
        KCenterGreedy(torch.randn(10, 4), 0.05)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("block_elements", [2**24, 300, 37])
def test_nearest_neighbors_equal_brute_force(k, block_elements):
    generator = torch.Generator().manual_seed(8)
    queries = torch.randn(131, 16, generator=generator)
    bank = torch.randn(97, 16, generator=generator)
    distances, indices = nearest_neighbors(queries, bank, k, block_elements=block_elements)
    expected_distances, expected_indices = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    assert distances.shape == indices.shape == (131, k)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)


def test_nearest_neighbors_of_bank_rows_are_themselves():
    bank = torch.randn(50, 8, generator=torch.Generator().manual_seed(9))
    distances, indices = nearest_neighbors(bank, bank, 1, block_elements=64)
    assert torch.equal(indices[:, 0], torch.arange(50))
    assert float(distances.max()) < 1e-2
