# src/defectvad/metrics/ciede2000.py
# the CIEDE2000 colour difference (CIE 142-2001), written from Sharma, Wu and Dalal 2005, eqs. 1-22
import math

import torch

from defectvad.metrics.colour_spaces import srgb_to_lab


def ciede2000(lab1, lab2, k_l=1.0, k_c=1.0, k_h=1.0):
    # lab1, lab2: (B, 3, ...) CIELAB; the difference per pixel (B, ...)
    l1, a1, b1 = lab1.unbind(dim=1)
    l2, a2, b2 = lab2.unbind(dim=1)
    c_mean = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    # hue angles in degrees in [0, 360); atan2(0, 0) = 0 as the paper asks for a neutral colour
    h1 = torch.rad2deg(torch.atan2(b1, a1)) % 360
    h2 = torch.rad2deg(torch.atan2(b2, a2)) % 360
    chroma_product = c1 * c2
    neutral = chroma_product == 0

    delta_l = l2 - l1
    delta_c = c2 - c1
    dh = h2 - h1
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(neutral, torch.zeros_like(dh), dh)
    delta_h = 2 * torch.sqrt(chroma_product) * torch.sin(torch.deg2rad(dh) / 2)

    l_mean = (l1 + l2) / 2
    c_mean = (c1 + c2) / 2
    h_sum = h1 + h2
    far = (h1 - h2).abs() > 180
    h_mean = torch.where(far, torch.where(h_sum < 360, h_sum + 360, h_sum - 360), h_sum) / 2
    h_mean = torch.where(neutral, h_sum, h_mean)

    t = (1 - 0.17 * torch.cos(torch.deg2rad(h_mean - 30)) + 0.24 * torch.cos(torch.deg2rad(2 * h_mean))
         + 0.32 * torch.cos(torch.deg2rad(3 * h_mean + 6)) - 0.20 * torch.cos(torch.deg2rad(4 * h_mean - 63)))
    delta_theta = 30 * torch.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / torch.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * c_mean
    s_h = 1 + 0.015 * c_mean * t
    r_t = -torch.sin(math.pi / 90 * delta_theta) * r_c

    lightness = delta_l / (k_l * s_l)
    chroma = delta_c / (k_c * s_c)
    hue = delta_h / (k_h * s_h)
    return torch.sqrt((lightness**2 + chroma**2 + hue**2 + r_t * chroma * hue).clamp(min=0))


def delta_e2000(first, second):
    # two sRGB images in [0, 1] (B, 3, H, W): the CIEDE2000 difference of every pixel (B, H, W)
    return ciede2000(srgb_to_lab(first), srgb_to_lab(second))
