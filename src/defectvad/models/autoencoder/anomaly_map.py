# src/defectvad/models/autoencoder/anomaly_map.py
import math

from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d
from defectvad.errors import ConfigError

SCORE_MODES = ("max", "topk")


class AnomalyMapGenerator(nn.Module):
    # squared reconstruction error averaged over channels, brought to the image size, optionally blurred
    def __init__(self, blur_sigma=4):
        super().__init__()
        if blur_sigma < 0:
            raise ConfigError(f"model.blur_sigma must be 0 (no blur) or positive, got {blur_sigma}")
        self.blur_sigma = blur_sigma

    def forward(self, target, reconstruction, image_size):
        error = (target - reconstruction).pow(2).mean(dim=1, keepdim=True)
        if tuple(error.shape[-2:]) != tuple(image_size):
            error = F.interpolate(error, size=tuple(image_size), mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            # built per call: the kernel is no part of the state dict, so a checkpoint serves any sigma
            error = GaussianBlur2d(sigma=self.blur_sigma).to(error.device)(error)
        return error


def compute_score(anomaly_map, score_mode="max", topk_ratio=0.01):
    flat = anomaly_map.flatten(1)
    if score_mode == "max":
        return flat.amax(dim=1)
    # the mean of the highest topk_ratio of the map's pixels, at least one
    count = max(1, math.ceil(topk_ratio * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


def check_score_mode(score_mode, topk_ratio):
    if score_mode not in SCORE_MODES:
        raise ConfigError(f"model.score_mode must be one of: {', '.join(SCORE_MODES)}; got '{score_mode}'")
    if not 0 < topk_ratio <= 1:
        raise ConfigError(f"model.topk_ratio must be in (0, 1], got {topk_ratio}")
