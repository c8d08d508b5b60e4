# src/defectvad/components/ssim.py
# structural similarity (Wang et al. 2004) with a Gaussian window: one implementation for the DRAEM loss and the
# image-quality metrics (metrics/image_quality.py)
import torch
from torch import nn
from torch.nn import functional as F

PADDINGS = ("reflect", "valid")


def gaussian_window(size, sigma, dtype=torch.float32, device=None):
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def separable_blur(images, window, padding="reflect"):
    # one 1-D pass per axis; reflect: same-size output over reflected borders, valid: only where the window fits
    channels, radius = images.shape[1], window.shape[0] // 2
    rows = window.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1)
    columns = window.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1)
    if padding == "reflect":
        images = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    images = F.conv2d(images, rows, groups=channels)
    if padding == "reflect":
        images = F.pad(images, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(images, columns, groups=channels)


def ssim_terms(first, second, window_size=11, sigma=1.5, max_val=1.0, padding="reflect", k1=0.01, k2=0.03):
    # per pixel and channel: the luminance term and the contrast-structure term, whose product is SSIM
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of: {', '.join(PADDINGS)}; got {padding!r}")
    window = gaussian_window(window_size, sigma, first.dtype, first.device)
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    mu1, mu2 = separable_blur(first, window, padding), separable_blur(second, window, padding)
    sigma1 = separable_blur(first * first, window, padding) - mu1**2
    sigma2 = separable_blur(second * second, window, padding) - mu2**2
    sigma12 = separable_blur(first * second, window, padding) - mu1 * mu2
    luminance = (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)
    contrast_structure = (2 * sigma12 + c2) / (sigma1 + sigma2 + c2)
    return luminance, contrast_structure


def ssim(first, second, window_size=11, sigma=1.5, max_val=1.0, padding="reflect"):
    # the per-pixel structural similarity map
    luminance, contrast_structure = ssim_terms(first, second, window_size, sigma, max_val, padding)
    return luminance * contrast_structure


class SSIMLoss(nn.Module):
    def __init__(self, window_size=11, sigma=1.5, max_val=1.0):
        super().__init__()
        self.window_size = window_size
        self.sigma = sigma
        self.max_val = max_val

    def forward(self, first, second):
        similarity = ssim(first, second, self.window_size, self.sigma, self.max_val)
        return torch.clamp(1 - similarity, 0, 2).mean()
