# src/defectvad/metrics/mura.py
# mura, the low-contrast, low-frequency non-uniformity of a display, as the spectral energy of the luminance in a
# radial band of low frequencies. Frequencies are counted in cycles per image along each axis (k_y cycles over the
# height, k_x over the width) and the radius is sqrt(k_y^2 + k_x^2), so the band means the same on any image size.
# The default band, 1 to 8 cycles per image, holds variations whose period spans from the whole image down to an
# eighth of it: blemishes of about a sixteenth of the image side and larger (SEMI D31 counts mura from such
# region sizes up). DC (the mean level) is never counted. No window is applied: a linear shading, which is not
# periodic, spreads its energy over low frequencies, where it belongs anyway.
import torch

MURA_BAND = (1.0, 8.0)


def radial_frequency(height, width, dtype=torch.float64, device=None):
    k_y = torch.fft.fftfreq(height, d=1 / height, dtype=dtype, device=device)
    k_x = torch.fft.fftfreq(width, d=1 / width, dtype=dtype, device=device)
    return torch.hypot(k_y[:, None], k_x[None, :])


def band_energies(luminance, band=MURA_BAND):
    # luminance (B, H, W) -> (energy in the band, energy at every frequency but DC), |FFT|^2 sums, per image
    low, high = band
    power = torch.fft.fft2(luminance).abs().pow(2)
    radius = radial_frequency(*luminance.shape[-2:], dtype=power.dtype, device=power.device)
    alternating = radius > 0
    inside = alternating & (radius >= low) & (radius <= high)
    return (power * inside).flatten(1).sum(dim=1), (power * alternating).flatten(1).sum(dim=1)


def mura_band_share(luminance, band=MURA_BAND):
    # the share in [0, 1] of the luminance's non-DC energy that lies in the band; 0 for a flat image
    energy, total = band_energies(luminance, band)
    return torch.where(total > 0, energy / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def mura_band_power(luminance, band=MURA_BAND):
    # the mean square of the band's component of the image (Parseval: sum |F|^2 / (H W)^2), in luminance units^2
    energy, _ = band_energies(luminance, band)
    return energy / luminance.shape[-1] ** 2 / luminance.shape[-2] ** 2
