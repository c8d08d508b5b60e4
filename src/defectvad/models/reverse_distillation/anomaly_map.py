# src/defectvad/models/reverse_distillation/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d, compute_kernel_size
from defectvad.errors import ConfigError

MODES = ("add", "multiply")


class AnomalyMapGenerator(nn.Module):
    def __init__(self, sigma=4, mode="add"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"anomaly_map_mode must be one of: {', '.join(MODES)}; got '{mode}'")
        self.sigma = sigma
        self.kernel_size = compute_kernel_size(sigma)
        self.mode = mode

    def forward(self, encoder_features, decoder_features, image_size):
        first = encoder_features[0]
        anomaly_map = torch.full((first.shape[0], 1, *image_size), float(self.mode == "multiply"), device=first.device)
        for encoder_feature, decoder_feature in zip(encoder_features, decoder_features, strict=True):
            distance = 1 - F.cosine_similarity(encoder_feature, decoder_feature).unsqueeze(1)
            distance = F.interpolate(distance, size=tuple(image_size), mode="bilinear", align_corners=True)
            anomaly_map = anomaly_map * distance if self.mode == "multiply" else anomaly_map + distance
        # built per call, as anomalib does: the kernel is no part of the state dict
        blur = GaussianBlur2d(sigma=self.sigma, kernel_size=self.kernel_size).to(first.device)
        return blur(anomaly_map)
