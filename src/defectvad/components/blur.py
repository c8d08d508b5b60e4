# src/defectvad/components/blur.py
import torch
from torch import nn
from torch.nn import functional as F


def compute_kernel_size(sigma):
    return 2 * int(4.0 * sigma + 0.5) + 1


def gaussian_kernel1d(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


class GaussianBlur2d(nn.Module):
    # same padding with reflected borders, as anomalib's blur; `kernel` is a buffer of shape (C, 1, kh, kw)
    def __init__(self, sigma, channels=1, kernel_size=None):
        super().__init__()
        sigma = sigma if isinstance(sigma, (tuple, list)) else (sigma, sigma)
        if kernel_size is None:
            kernel_size = (compute_kernel_size(sigma[0]), compute_kernel_size(sigma[1]))
        elif isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        kernel = torch.outer(gaussian_kernel1d(kernel_size[0], sigma[0]), gaussian_kernel1d(kernel_size[1], sigma[1]))
        kernel = kernel / kernel.sum()
        self.channels = channels
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).contiguous())
        height, width = kernel_size
        self.padding = ((width - 1) // 2, width // 2, (height - 1) // 2, height // 2)

    def forward(self, x):
        x = F.pad(x, self.padding, mode="reflect")
        return F.conv2d(x, self.kernel, groups=self.channels)
