# src/defectvad/components/ssim.py
import torch
from torch import nn
from torch.nn import functional as F


def gaussian_window(size, sigma, dtype=torch.float32, device=None):
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def separable_blur(images, window):
    # same-size output with reflected borders, one 1-D pass per axis
    channels, radius = images.shape[1], window.shape[0] // 2
    rows = window.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1)
    columns = window.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="reflect"), columns, groups=channels)


def ssim(first, second, window_size=11, sigma=1.5, max_val=1.0, eps=1e-12):
    # the per-pixel structural similarity map, Gaussian-weighted local statistics
    window = gaussian_window(window_size, sigma, first.dtype, first.device)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu1, mu2 = separable_blur(first, window), separable_blur(second, window)
    sigma1 = separable_blur(first * first, window) - mu1**2
    sigma2 = separable_blur(second * second, window) - mu2**2
    sigma12 = separable_blur(first * second, window) - mu1 * mu2
    numerator = (2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)
    denominator = (mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2)
    return numerator / (denominator + eps)


class SSIMLoss(nn.Module):
    def __init__(self, window_size=11, sigma=1.5, max_val=1.0):
        super().__init__()
        self.window_size = window_size
        self.sigma = sigma
        self.max_val = max_val

    def forward(self, first, second):
        similarity = ssim(first, second, self.window_size, self.sigma, self.max_val)
        return torch.clamp(1 - similarity, 0, 2).mean()
