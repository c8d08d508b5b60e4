# src/defectvad/models/supersimplenet/anomaly_map.py
import math

from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d


class AnomalyMapGenerator(nn.Module):
    # the segmentation head's map, upscaled to the input and smoothed (a 25x25 kernel for sigma 4, as anomalib)
    def __init__(self, sigma=4):
        super().__init__()
        self.smoothing = GaussianBlur2d(sigma=sigma, kernel_size=2 * math.ceil(3 * sigma) + 1)

    def forward(self, out_map, final_size):
        return self.smoothing(F.interpolate(out_map, size=tuple(final_size), mode="bilinear"))
