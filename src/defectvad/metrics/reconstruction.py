# src/defectvad/metrics/reconstruction.py
# display-quality figures of a reconstruction model's output against its input image, batch by batch during
# prediction, for the reconstruction block of metrics.json
import logging
import math

import torch

from defectvad.metrics.ciede2000 import delta_e2000
from defectvad.metrics.colour_spaces import luminance
from defectvad.metrics.image_quality import (MS_SSIM_WEIGHTS, combine_scales, ms_ssim_min_size, psnr, ssim_scales,
                                             ssim_score)
from defectvad.metrics.lpips import choose_lpips_net, load_lpips
from defectvad.metrics.mura import MURA_BAND, mura_band_share

log = logging.getLogger("defectvad")

# identical images would give an infinite PSNR, which JSON cannot hold
PSNR_CAP = 100.0


class ReconstructionMeter:
    # called with each evaluation batch and the model's outputs; only an RGB reconstruction of the input's size
    # (InferenceBatch extras "reconstruction", images in [0, 1]) counts, so other models leave it empty
    def __init__(self, lpips=None, backbone_dir=None):
        self.lpips_net = choose_lpips_net(lpips, backbone_dir)
        self.backbone_dir = backbone_dir
        self.lpips_model = None
        self.sums = {}
        self.count = 0
        self.size = None

    def __call__(self, batch, outputs):
        reconstruction = outputs.get("reconstruction") if hasattr(outputs, "get") else None
        images = batch["image"]
        if reconstruction is None or reconstruction.shape != images.shape or images.shape[1] != 3:
            return
        # a reconstruction may stray out of [0, 1] (DRAEM's has no output activation)
        images, reconstruction = images.float(), reconstruction.float().clamp(0, 1)
        self.size = list(images.shape[-2:])
        self.add("psnr", psnr(reconstruction, images).clamp(max=PSNR_CAP))
        if min(self.size) >= ms_ssim_min_size():
            # MS-SSIM's finest scale is SSIM
            ssims, contrasts = ssim_scales(reconstruction, images, len(MS_SSIM_WEIGHTS))
            self.add("ssim", ssims[:, 0])
            self.add("ms_ssim", combine_scales(ssims, contrasts))
        else:
            self.add("ssim", ssim_score(reconstruction, images))
        self.add("delta_e2000", delta_e2000(reconstruction, images).flatten(1).mean(dim=1))
        self.add("mura_band_share", mura_band_share(luminance(images) - luminance(reconstruction)))
        if self.lpips_net is not None:
            self.add("lpips", self.measure_lpips(reconstruction, images))
        self.count += len(images)

    def add(self, key, values):
        self.sums[key] = self.sums.get(key, 0.0) + float(values.double().sum())

    def measure_lpips(self, first, second):
        if self.lpips_model is None:
            self.lpips_model = load_lpips(self.lpips_net, self.backbone_dir)
        model = self.lpips_model.to(first.device)
        # a few images at a time: VGG's first feature maps are large
        return torch.cat([model(one, two) for one, two in zip(first.split(8), second.split(8))])

    def summary(self):
        means = {key: value / self.count for key, value in self.sums.items()}
        for key, value in means.items():
            if not math.isfinite(value):
                log.warning("reconstruction %s is %s", key, value)
                means[key] = None
        return {
            "images": self.count,
            "psnr": means["psnr"],
            "ssim": means["ssim"],
            "ms_ssim": means.get("ms_ssim"),
            "delta_e2000": means["delta_e2000"],
            "mura_band_share": means["mura_band_share"],
            **({"lpips": means["lpips"], "lpips_net": self.lpips_net} if "lpips" in means else {}),
            "note": (f"means over the test images of the reconstruction (clamped to [0, 1]) against the input at "
                     f"{self.size[0]}x{self.size[1]}; PSNR in dB, capped at {PSNR_CAP:g}; SSIM and MS-SSIM with an "
                     f"11x11 Gaussian window (sigma 1.5), MS-SSIM only on images of {ms_ssim_min_size()} pixels a "
                     f"side or more; delta_e2000: mean CIEDE2000 per pixel (sRGB to Lab D65); mura_band_share: "
                     f"share of the residual luminance's non-DC spectral energy at {MURA_BAND[0]:g} to "
                     f"{MURA_BAND[1]:g} cycles per image"),
        }
