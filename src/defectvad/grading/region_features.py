# src/defectvad/grading/region_features.py
# a region's pooled backbone features: each layer's map averaged over the region (its mask resized to the
# layer's grid by area, so a region smaller than a cell still weighs in), minus the whole image's average
# (the panel or part around it), the layers concatenated; no layers: the backbone's second and third stages
import torch
import torch.nn.functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import get_backbone

EPS = 1e-12


class RegionFeatures:
    def __init__(self, backbone, layers, weights_path=None, device="cpu"):
        self.device = torch.device(device)
        self.layers = list(layers or get_backbone(backbone).default_layers((1, 2)))
        self.extractor = FeatureExtractor(backbone, self.layers, weights_path).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, image, masks):
        # image: (3, H, W) normalised as the backbone expects; masks: (H', W') boolean arrays; (len(masks), D)
        if not masks:
            return torch.zeros(0, 0).numpy()
        features = self.extractor(image.unsqueeze(0).float().to(self.device))
        regions = torch.stack([torch.as_tensor(mask, dtype=torch.float32) for mask in masks]).unsqueeze(1)
        pooled = []
        for layer in self.layers:
            feature = features[layer][0].float()
            weights = F.interpolate(regions.to(self.device), size=feature.shape[-2:], mode="area")[:, 0]
            inside = torch.einsum("chw,rhw->rc", feature, weights) / weights.sum((1, 2)).clamp_min(EPS)[:, None]
            pooled.append(inside - feature.mean((1, 2))[None])
        return torch.cat(pooled, 1).cpu().double().numpy()
