# src/defectvad/models/uninet/feature_selection.py
import torch
from torch import nn
from torch.nn import functional as F


class DomainRelatedFeatureSelection(nn.Module):
    # weighs the student's features by a spatial softmax of the teacher's, per channel, scaled by a learnt
    # theta in [0.5, 1] plus the teacher's channel mean; one theta per scale, shared by both teachers' halves
    def __init__(self, channels=(256, 512, 1024)):
        super().__init__()
        for index, count in enumerate(channels, start=1):
            self.register_parameter(f"theta{index}", nn.Parameter(torch.zeros(1, count, 1, 1)))
        self.scales = len(channels)

    def forward(self, source_features, target_features):
        features = []
        for index, (source, target) in enumerate(zip(source_features, target_features, strict=True)):
            theta = getattr(self, f"theta{index % self.scales + 1}")
            theta = torch.clamp(torch.sigmoid(theta) + 0.5, max=1)
            batch, channels, height, width = source.shape
            prior = target.view(batch, channels, -1)
            prior = prior - prior.max(dim=-1, keepdim=True)[0]
            weights = F.softmax(prior, dim=-1).view(batch, channels, height, width)
            global_mean = target.mean(dim=(-2, -1), keepdim=True)
            features.append(source * (weights * (theta + global_mean)))
        return features
