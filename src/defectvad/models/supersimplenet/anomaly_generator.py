# src/defectvad/models/supersimplenet/anomaly_generator.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.components.perlin import generate_perlin_noise


def next_power_2(num):
    return 1 << (num - 1).bit_length()


class AnomalyGenerator(nn.Module):
    # synthetic anomalies in feature space: the batch is doubled and Gaussian noise is added inside a binarised
    # Perlin region of each feature map (no region at all for about half of them); masks and labels follow
    def __init__(self, noise_mean=0.0, noise_std=0.015, threshold=0.2):
        super().__init__()
        self.noise_mean = noise_mean
        self.noise_std = noise_std
        self.threshold = threshold

    def generate_perlin(self, batches, height, width):
        masks = []
        for _ in range(batches):
            # drawn at the next power of two and resized, as anomalib (same random draws, same order)
            perlin_height, perlin_width = next_power_2(height), next_power_2(width)
            noise = generate_perlin_noise(perlin_height, perlin_width)
            if not (noise > self.threshold).any():
                # a field that never crosses the threshold is stretched to [-1, 1]
                noise = 2 * (noise - noise.min()) / (noise.max() - noise.min()) - 1
            noise = F.interpolate(noise.reshape(1, 1, perlin_height, perlin_width), size=(height, width),
                                  mode="bilinear")
            mask = torch.where(noise > self.threshold, 1, 0)
            if torch.rand(1).item() > 0.5:
                mask = torch.zeros_like(mask)
            masks.append(mask)
        return torch.cat(masks)

    def forward(self, input_features, adapted_features, masks, labels):
        batch, _, height, width = masks.shape
        adapted_features = torch.cat((adapted_features, adapted_features))
        masks = torch.cat((masks, masks))
        labels = torch.cat((labels, labels))
        if input_features is not None:
            input_features = torch.cat((input_features, input_features))
        noise = torch.normal(mean=self.noise_mean, std=self.noise_std, size=adapted_features.shape,
                             device=adapted_features.device)
        # noise only outside the regions already anomalous and inside the Perlin region
        noise_mask = (1 - masks) * self.generate_perlin(2 * batch, height, width).to(adapted_features.device)
        masks = (masks + noise_mask > 0).float()
        new_anomalous = noise_mask.reshape(2 * batch, -1).any(dim=1).float()
        labels = (labels + new_anomalous > 0).float()
        perturbed_adapted = adapted_features + noise * noise_mask
        perturbed_features = None if input_features is None else input_features + noise * noise_mask
        return perturbed_features, perturbed_adapted, masks, labels
