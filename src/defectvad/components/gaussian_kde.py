# src/defectvad/components/gaussian_kde.py
import math

import torch

from defectvad.components.dynamic_buffers import DynamicBufferMixin

# elements of one (queries x points x dims) block of differences
BLOCK_ELEMENTS = 2**23


class GaussianKDE(DynamicBufferMixin):
    # Gaussian kernel density with the full-covariance bandwidth of Scott's rule (factor n^(-1/(d+4))),
    # as anomalib's: points are stored already whitened by the Cholesky factor of the inverse bandwidth
    def __init__(self):
        super().__init__()
        self.register_buffer("bw_transform", torch.empty(0))
        self.register_buffer("dataset", torch.empty(0))
        self.register_buffer("norm", torch.empty(0))

    def fit(self, dataset):
        num_samples, dimension = dataset.shape
        factor = num_samples ** (-1 / (dimension + 4))
        inv_cov = torch.linalg.inv(self.cov(dataset.T)) / factor**2
        bw_transform = torch.linalg.cholesky(inv_cov)
        norm = torch.prod(torch.diag(bw_transform)) * math.pow(2 * math.pi, -dimension / 2)
        self.bw_transform = bw_transform
        self.dataset = torch.matmul(dataset, bw_transform)
        self.norm = norm
        return self

    def forward(self, features):
        features = torch.matmul(features, self.bw_transform)
        step = max(1, BLOCK_ELEMENTS // max(1, self.dataset.numel()))
        estimates = []
        for first in range(0, features.shape[0], step):
            chunk = features[first:first + step]
            # the direct difference, not the norm expansion, so that far points keep their precision
            squared = ((self.dataset.unsqueeze(0) - chunk.unsqueeze(1)) ** 2).sum(dim=2)
            estimates.append(torch.mean(torch.exp(-squared / 2) * self.norm, dim=1))
        return torch.cat(estimates)

    @staticmethod
    def cov(tensor):
        centred = tensor - torch.mean(tensor, dim=1, keepdim=True)
        return torch.matmul(centred, centred.T) / (tensor.size(1) - 1)
