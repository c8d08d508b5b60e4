# src/defectvad/models/padim/anomaly_map.py
from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d, compute_kernel_size


class AnomalyMapGenerator(nn.Module):
    def __init__(self, sigma=4):
        super().__init__()
        size = compute_kernel_size(sigma)
        self.blur = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=(size, size))

    @staticmethod
    def compute_distance(embedding, mean, inv_covariance):
        batch, channels, height, width = embedding.shape
        delta = (embedding.reshape(batch, channels, height * width) - mean).permute(2, 0, 1)
        # Mahalanobis distance of every patch to its position's Gaussian
        distances = (delta @ inv_covariance * delta).sum(2).permute(1, 0)
        return distances.reshape(batch, 1, height, width).clamp(min=0).sqrt()

    def forward(self, embedding, mean, inv_covariance, image_size=None):
        score_map = self.compute_distance(embedding, mean.to(embedding.device), inv_covariance.to(embedding.device))
        if image_size is not None:
            score_map = F.interpolate(score_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        return self.blur(score_map)
