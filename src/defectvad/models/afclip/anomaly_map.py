# src/defectvad/models/afclip/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F


def reflect_indices(size, pad, device):
    # scipy.ndimage's "reflect" border (d c b a | a b c d | d c b a), for any pad
    index = torch.arange(-pad, size + pad, device=device) % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


class AnomalyMapGenerator(nn.Module):
    # the patch map resized bilinearly to the input, then scipy's gaussian_filter (sigma 4, truncate 4)
    def __init__(self, sigma=4.0, truncate=4.0):
        super().__init__()
        self.sigma = sigma
        radius = int(truncate * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * x ** 2 / sigma ** 2)
        self.radius = radius
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def blur(self, maps):
        if not self.sigma:
            return maps
        height, width = maps.shape[-2:]
        kernel = self.kernel.to(maps.dtype)
        x = maps.index_select(-2, reflect_indices(height, self.radius, maps.device))
        x = F.conv2d(x, kernel.view(1, 1, -1, 1))
        x = x.index_select(-1, reflect_indices(width, self.radius, maps.device))
        return F.conv2d(x, kernel.view(1, 1, 1, -1))

    def forward(self, patch_map, image_size):
        maps = F.interpolate(patch_map, size=tuple(image_size), mode="bilinear")
        return self.blur(maps)
