# src/defectvad/models/glass/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.components.blur import gaussian_kernel1d


class RescaleSegmentor(nn.Module):
    # patch scores (B, h, w) -> bilinear upsampling to the input size, then a Gaussian blur with reflected borders
    # (kernel_size 33, sigma 4); the kernel is the buffer `_kernel` (1, 1, K, K), as anomalib's
    def __init__(self, kernel_size=33, sigma=4.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = kernel_size
        self.sigma = sigma
        line = gaussian_kernel1d(kernel_size, sigma)
        kernel = torch.outer(line, line)
        self.register_buffer("_kernel", (kernel / kernel.sum())[None, None])

    @torch.no_grad()
    def convert_to_segmentation(self, patch_scores, target_size):
        scores = F.interpolate(patch_scores.unsqueeze(1), size=tuple(target_size), mode="bilinear", align_corners=False)
        pad = self.kernel_size // 2
        scores = F.pad(scores, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(scores, self._kernel.to(scores.dtype))
