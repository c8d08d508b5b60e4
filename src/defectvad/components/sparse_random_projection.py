# src/defectvad/components/sparse_random_projection.py
import numpy as np
import torch
from sklearn.utils.random import sample_without_replacement

from defectvad.errors import ConfigError


def johnson_lindenstrauss_min_dim(n_samples, eps=0.1):
    # dimensions that keep pairwise distances within 1 +- eps (Achlioptas' bound, as scikit-learn and anomalib)
    denominator = (eps**2 / 2) - (eps**3 / 3)
    return int((4 * np.log(n_samples) / denominator).astype(np.int64))


class SparseRandomProjection:
    # Achlioptas/Li sparse projection with density 1 / sqrt(n_features). The draws follow anomalib's:
    # torch's generator for the non-zero counts and signs, numpy's global one for the column picks,
    # so the same torch and numpy seeds give the same matrix
    def __init__(self, eps=0.1, random_state=None):
        self.eps = eps
        self.random_state = random_state
        self.n_components = None
        self.sparse_random_matrix = None

    def fit(self, embedding):
        n_samples, n_features = embedding.shape
        if n_samples < 2:
            raise ConfigError(f"the random projection needs at least 2 embeddings, got {n_samples}")
        self.n_components = johnson_lindenstrauss_min_dim(n_samples, self.eps)
        self.sparse_random_matrix = self.create_matrix(n_features).to(embedding.device)
        return self

    def create_matrix(self, n_features):
        density = 1 / np.sqrt(n_features)
        if density == 1:
            signs = torch.distributions.Binomial(total_count=1, probs=0.5).sample((self.n_components, n_features))
            return (signs * 2 - 1) / np.sqrt(self.n_components)
        matrix = torch.zeros((self.n_components, n_features), dtype=torch.float32)
        for row in range(self.n_components):
            nonzero = torch.distributions.Binomial(total_count=n_features, probs=density).sample()
            columns = sample_without_replacement(n_population=n_features, n_samples=int(nonzero),
                                                 random_state=self.random_state)
            columns = torch.tensor(columns, dtype=torch.int64)
            signs = torch.distributions.Binomial(total_count=1, probs=0.5).sample(columns.size()) * 2 - 1
            matrix[row, columns] = signs
        matrix *= np.sqrt(1 / density) / np.sqrt(self.n_components)
        return matrix

    def transform(self, embedding):
        if self.sparse_random_matrix is None:
            raise RuntimeError("SparseRandomProjection.transform was called before fit")
        return embedding @ self.sparse_random_matrix.T.type(embedding.dtype)
