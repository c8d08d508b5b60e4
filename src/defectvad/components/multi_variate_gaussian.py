# src/defectvad/components/multi_variate_gaussian.py
import torch

from defectvad.components.dynamic_buffers import DynamicBufferMixin


class MultiVariateGaussian(DynamicBufferMixin):
    # one Gaussian per patch position, with 0.01 * I added to each covariance as in PaDiM
    def __init__(self, regularization=0.01):
        super().__init__()
        self.regularization = regularization
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))

    def forward(self, embedding):
        batch, channels, height, width = embedding.shape
        vectors = embedding.reshape(batch, channels, height * width)
        self.mean = vectors.mean(dim=0)
        centred = (vectors - self.mean).permute(2, 0, 1)
        # (patches, channels, channels), the unbiased covariance of each patch position
        covariance = torch.bmm(centred.transpose(1, 2), centred) / (batch - 1)
        identity = torch.eye(channels, device=embedding.device, dtype=embedding.dtype)
        covariance = covariance + (self.regularization + 1e-5) * identity
        self.inv_covariance = torch.linalg.inv(covariance)
        return [self.mean, self.inv_covariance]

    def fit(self, embedding):
        return self.forward(embedding)
