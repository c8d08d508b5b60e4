# src/defectvad/engine/synthetic_validation.py
import torch
from torch.utils.data import Dataset

from defectvad.components.perlin import generate_perlin_mask, generate_perlin_noise


class SyntheticAnomalySet(Dataset):
    # held-out normal images, each twice: as it is (label 0) and with a Perlin-shaped region filled with
    # Perlin noise in the image's own value range (label 1, the region as mask); an honest validation split
    # for early stopping, as neither copy is a test image; the same seed gives the same anomalies
    has_masks = True

    def __init__(self, normal_set, seed=0):
        self.normal_set = normal_set
        self.seed = seed

    def __len__(self):
        return 2 * len(self.normal_set)

    def __getitem__(self, index):
        sample = dict(self.normal_set[index % len(self.normal_set)])
        if index < len(self.normal_set):
            return sample
        image, mask = paste_noise(sample["image"], self.seed * 100003 + index)
        sample.update(image=image, mask=mask, label=1, defect_type="synthetic",
                      image_path=f"{sample['image_path']}#synthetic")
        return sample


def paste_noise(image, seed):
    # image (C, H, W) -> (image with a noise region, mask (1, H, W)); the global generator is left untouched
    channels, height, width = image.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, mask = generate_perlin_mask(height, width)
        if not mask.any():
            mask[height // 4: height // 2, width // 4: width // 2] = 1
        noise = torch.stack([generate_perlin_noise(height, width) for _ in range(channels)])
    low, high = image.min(), image.max()
    texture = low + (high - low) * (noise.clamp(-1, 1) + 1) / 2
    mask = mask.to(image.dtype)[None]
    return image * (1 - mask) + texture.to(image.dtype) * mask, mask
