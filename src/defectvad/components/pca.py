# src/defectvad/components/pca.py
import torch

from defectvad.components.dynamic_buffers import DynamicBufferMixin


class PCA(DynamicBufferMixin):
    # anomalib's torch PCA. n_components <= 1 keeps a share of the variance: the component count is the
    # index of the first cumulative ratio reaching it (anomalib's rule, one fewer than scikit-learn's);
    # above 1 it is the count itself
    def __init__(self, n_components):
        super().__init__()
        self.n_components = n_components
        self.register_buffer("singular_vectors", torch.empty(0))
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("num_components", torch.empty(0))
        self.singular_values = None

    def fit(self, dataset):
        mean = dataset.mean(dim=0)
        _, sig, v_h = torch.linalg.svd((dataset - mean).double(), full_matrices=False)
        if self.n_components <= 1:
            variance_ratios = torch.cumsum(sig * sig, dim=0) / torch.sum(sig * sig)
            num_components = int(torch.nonzero(variance_ratios >= self.n_components)[0])
        else:
            num_components = int(self.n_components)
        self.num_components = torch.tensor([num_components], device=dataset.device)
        self.singular_vectors = v_h.transpose(-2, -1)[:, :num_components].float()
        self.singular_values = sig[:num_components].float()
        self.mean = mean
        return self

    def fit_transform(self, dataset):
        # a fixed count, in the input's precision, as anomalib's DFKDE path does
        mean = dataset.mean(dim=0)
        centred = dataset - mean
        num_components = int(self.n_components)
        self.num_components = torch.tensor([num_components], device=dataset.device)
        v_h = torch.linalg.svd(centred)[-1]
        self.singular_vectors = v_h.transpose(-2, -1)[:, :num_components]
        self.mean = mean
        return torch.matmul(centred, self.singular_vectors)

    def transform(self, features):
        return torch.matmul(features - self.mean, self.singular_vectors)

    def inverse_transform(self, features):
        # back to the centred feature space (the mean is not added back)
        return torch.matmul(features, self.singular_vectors.transpose(-2, -1))

    def forward(self, features):
        return self.transform(features)
