# src/defectvad/metrics/image_quality.py
# full-reference image quality per image of a batch (B, C, H, W): PSNR, SSIM, MS-SSIM. SSIM is Wang et al. 2004 with
# an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population statistics, averaged over the pixels where the
# window fits and over channels (as scikit-image's structural_similarity with gaussian_weights=True)
import torch
from torch.nn import functional as F

from defectvad.components.ssim import ssim, ssim_terms

# Wang, Simoncelli and Bovik 2003: the exponents of the five scales, finest first
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(first, second, max_val=1.0):
    # in dB; identical images give inf
    mse = (first - second).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(max_val**2 / mse)


def ssim_score(first, second, max_val=1.0, window_size=11, sigma=1.5):
    return ssim(first, second, window_size, sigma, max_val, padding="valid").flatten(1).mean(dim=1)


def ms_ssim_min_size(window_size=11, scales=len(MS_SSIM_WEIGHTS)):
    # the window must fit the coarsest scale, reached by scales - 1 halvings
    return window_size * 2 ** (scales - 1)


def ssim_scales(first, second, scales, max_val=1.0, window_size=11, sigma=1.5):
    # per image and scale, finest first: the mean SSIM and the mean contrast-structure term, (B, scales) each;
    # between scales a 2x2 mean and a halving (the reference code's [0.5 0.5] low-pass)
    ssims, contrasts = [], []
    for scale in range(scales):
        if scale:
            first, second = F.avg_pool2d(first, 2), F.avg_pool2d(second, 2)
        luminance, contrast_structure = ssim_terms(first, second, window_size, sigma, max_val, padding="valid")
        ssims.append((luminance * contrast_structure).flatten(1).mean(dim=1))
        contrasts.append(contrast_structure.flatten(1).mean(dim=1))
    return torch.stack(ssims, dim=1), torch.stack(contrasts, dim=1)


def combine_scales(ssims, contrasts, weights=MS_SSIM_WEIGHTS):
    # contrast-structure at every scale but the coarsest, SSIM there; negative means are set to 0 before the
    # powers, as pytorch_msssim does
    last = len(weights) - 1
    values = torch.cat([contrasts[:, :last], ssims[:, last:last + 1]], dim=1).clamp(min=0)
    return values.pow(torch.tensor(weights, dtype=values.dtype, device=values.device)).prod(dim=1)


def ms_ssim(first, second, max_val=1.0, window_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS):
    if min(first.shape[-2:]) < ms_ssim_min_size(window_size, len(weights)):
        raise ValueError(f"MS-SSIM with {len(weights)} scales needs images of at least "
                         f"{ms_ssim_min_size(window_size, len(weights))} pixels a side, got {list(first.shape[-2:])}")
    return combine_scales(*ssim_scales(first, second, len(weights), max_val, window_size, sigma), weights)
