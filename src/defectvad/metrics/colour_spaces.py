# src/defectvad/metrics/colour_spaces.py
# sRGB (IEC 61966-2-1) in [0, 1], channels on dim 1, to linear RGB, CIE XYZ and CIELAB under D65 (2 degree observer)
import torch

# linear sRGB -> XYZ from the sRGB primaries and the D65 white point; its rows sum to the white point
SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
D65_WHITE = (0.95047, 1.0, 1.08883)
LAB_EPSILON = (6 / 29) ** 3


def srgb_to_linear(images):
    return torch.where(images <= 0.04045, images / 12.92, ((images.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def srgb_to_xyz(images):
    matrix = torch.tensor(SRGB_TO_XYZ, dtype=images.dtype, device=images.device)
    return torch.einsum("ij,bj...->bi...", matrix, srgb_to_linear(images))


def xyz_to_lab(xyz):
    white = torch.tensor(D65_WHITE, dtype=xyz.dtype, device=xyz.device).reshape(1, 3, *[1] * (xyz.dim() - 2))
    t = xyz / white
    f = torch.where(t > LAB_EPSILON, t.clamp(min=LAB_EPSILON) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def srgb_to_lab(images):
    return xyz_to_lab(srgb_to_xyz(images))


def luminance(images):
    # relative luminance Y in [0, 1] (B, H, W); a one-channel image is its own luminance
    if images.shape[1] == 1:
        return images[:, 0]
    weights = torch.tensor(SRGB_TO_XYZ[1], dtype=images.dtype, device=images.device)
    return torch.einsum("j,bj...->b...", weights, srgb_to_linear(images))
