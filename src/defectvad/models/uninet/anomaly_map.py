# src/defectvad/models/uninet/anomaly_map.py
import torch
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d


def weighted_decision_mechanism(distances, image_size):
    # the map: the sum of the per-scale cosine distances (B, h, w), upsampled with aligned corners;
    # the score: the maximum of the map blurred by a 5x5 Gaussian of sigma 4. anomalib 2.7 keeps the
    # authors' alpha and beta arguments but no longer uses them (their top-k only ever read the maximum)
    anomaly_map = torch.zeros(distances[0].shape[0], 1, *image_size, device=distances[0].device)
    for distance in distances:
        anomaly_map = anomaly_map + F.interpolate(distance.unsqueeze(1), size=tuple(image_size), mode="bilinear",
                                                  align_corners=True)
    # built per call, as anomalib does: the kernel is no part of the state dict
    blur = GaussianBlur2d(sigma=4.0, kernel_size=5).to(anomaly_map.device)
    return blur(anomaly_map).flatten(1).amax(dim=1), anomaly_map
