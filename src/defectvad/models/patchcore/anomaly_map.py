# src/defectvad/models/patchcore/anomaly_map.py
from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d, compute_kernel_size


class AnomalyMapGenerator(nn.Module):
    def __init__(self, sigma=4):
        super().__init__()
        size = compute_kernel_size(sigma)
        self.blur = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=(size, size))

    def forward(self, patch_scores, image_size=None):
        # nearest-neighbour upsampling of the patch scores, then the blur, as anomalib
        if image_size is not None:
            patch_scores = F.interpolate(patch_scores, size=(image_size[0], image_size[1]))
        return self.blur(patch_scores)
