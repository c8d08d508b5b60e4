# src/defectvad/components/multi_variate_gaussian.py
import torch

from defectvad.components.dynamic_buffers import DynamicBufferMixin

# float32 elements of the centred vectors and covariances computed at once (64 MB)
CHUNK_ELEMENTS = 2**24


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
        inv_covariance = vectors.new_empty((height * width, channels, channels))
        # a few patch positions at a time: the centred copy and the covariances never exist whole
        step = max(1, CHUNK_ELEMENTS // (channels * (channels + batch)))
        for start in range(0, height * width, step):
            stop = min(start + step, height * width)
            centred = (vectors[:, :, start:stop] - self.mean[:, start:stop]).permute(2, 0, 1)
            # (patches, channels, channels), the unbiased covariance of each patch position
            covariance = torch.bmm(centred.transpose(1, 2), centred) / (batch - 1)
            covariance.diagonal(dim1=-2, dim2=-1).add_(self.regularization + 1e-5)
            inv_covariance[start:stop] = torch.linalg.inv(covariance)
        self.inv_covariance = inv_covariance
        return [self.mean, self.inv_covariance]

    def fit(self, embedding):
        return self.forward(embedding)
