# src/defectvad/models/cfa/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d


class AnomalyMapGenerator(nn.Module):
    def __init__(self, num_nearest_neighbors, sigma=4):
        super().__init__()
        self.num_nearest_neighbors = num_nearest_neighbors
        self.sigma = sigma

    def compute_score(self, distance, scale):
        # the root is monotonic, so it is taken after the top-k, on K values instead of all centres;
        # rounding can leave tiny negative squared distances, whose root anomalib would make NaN
        distance = distance.topk(self.num_nearest_neighbors, largest=False).values
        distance = torch.sqrt(distance.clamp_min(0))
        # the nearest distance weighted by its softmin share among the K nearest
        distance = F.softmin(distance, dim=-1)[:, :, 0] * distance[:, :, 0]
        return distance.reshape(distance.shape[0], 1, scale[0], scale[1]).detach()

    def compute_anomaly_map(self, score, image_size=None):
        anomaly_map = score.mean(dim=1, keepdim=True)
        if image_size is not None:
            anomaly_map = F.interpolate(anomaly_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        # built per call as in anomalib, so its kernel is not part of the state dict
        return GaussianBlur2d(sigma=self.sigma).to(score.device)(anomaly_map)

    def forward(self, distance, scale, image_size=None):
        return self.compute_anomaly_map(self.compute_score(distance, scale), image_size=image_size)
