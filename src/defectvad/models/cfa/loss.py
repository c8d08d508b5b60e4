# src/defectvad/models/cfa/loss.py
import torch
from torch import nn


class CfaLoss(nn.Module):
    def __init__(self, num_nearest_neighbors=3, num_hard_negative_features=3, radius=1e-5):
        super().__init__()
        self.num_nearest_neighbors = num_nearest_neighbors
        self.num_hard_negative_features = num_hard_negative_features
        self.radius = torch.ones(1) * radius

    def forward(self, distance):
        num_neighbors = self.num_nearest_neighbors + self.num_hard_negative_features
        distance = distance.topk(num_neighbors, largest=False).values
        radius_sq = (self.radius**2).to(distance.device)
        # attraction: the K nearest centres inside the hypersphere
        score = distance[:, :, : self.num_nearest_neighbors] - radius_sq
        l_att = torch.mean(torch.clamp_min(score, 0))
        # repulsion: the next ones (anomalib indexes them from J on) at least a margin of 0.1 outside
        score = radius_sq - distance[:, :, self.num_hard_negative_features:]
        l_rep = torch.mean(torch.clamp_min(score - 0.1, 0))
        return (l_att + l_rep) * 1000
