# src/defectvad/components/perlin.py
import math

import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF


def fade(t):
    return t * t * t * (t * (6 * t - 15) + 10)


def generate_perlin_noise(height, width, scale=None, device=None):
    # gradient noise on a (scale_y + 1) x (scale_x + 1) lattice of random unit gradients; values in about [-1, 1]
    if scale is None:
        scale = tuple(2 ** int(torch.randint(0, 6, (1,))) for _ in range(2))
    scale_y, scale_x = scale
    angles = 2 * math.pi * torch.rand(scale_y + 1, scale_x + 1, device=device)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    y = torch.arange(height, device=device, dtype=torch.float32) * scale_y / height
    x = torch.arange(width, device=device, dtype=torch.float32) * scale_x / width
    cell_y, cell_x = y.long(), x.long()
    offset_y, offset_x = torch.meshgrid(y - cell_y, x - cell_x, indexing="ij")
    cell_y, cell_x = torch.meshgrid(cell_y, cell_x, indexing="ij")

    def corner(dy, dx):
        gradient = gradients[cell_y + dy, cell_x + dx]
        return gradient[..., 0] * (offset_y - dy) + gradient[..., 1] * (offset_x - dx)

    weight_y, weight_x = fade(offset_y), fade(offset_x)
    top = torch.lerp(corner(0, 0), corner(0, 1), weight_x)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), weight_x)
    return math.sqrt(2) * torch.lerp(top, bottom, weight_y)


def generate_perlin_mask(height, width, threshold=0.5, rotation=(-90, 90), device=None, attempts=10):
    # a rotated, thresholded Perlin field: blob-shaped regions of random size and count
    for _ in range(attempts):
        noise = generate_perlin_noise(height, width, device=device)
        if not (noise > threshold).any():
            # too smooth a field never crosses the threshold: stretch it to [-1, 1]
            noise = 2 * (noise - noise.min()) / (noise.max() - noise.min()).clamp(min=1e-12) - 1
        angle = float(torch.empty(1).uniform_(*rotation))
        noise = TF.rotate(noise[None], angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)[0]
        mask = (noise > threshold).float()
        if mask.any():
            break
    return noise, mask


def create_texture_augmenters():
    # photometric and geometric changes drawn three at a time, so that no texture looks like its source
    return [
        v2.ColorJitter(contrast=(0.5, 2.0)),
        v2.ColorJitter(brightness=(0.8, 1.2)),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=1.0),
        v2.ColorJitter(hue=(-50 / 360, 50 / 360), saturation=(0.5, 1.5)),
        RandomSolarize(),
        v2.RandomPosterize(bits=4, p=1.0),
        v2.RandomInvert(p=1.0),
        v2.AutoAugment(),
        v2.RandomEqualize(p=1.0),
        v2.RandomAffine(degrees=(-45, 45), interpolation=InterpolationMode.BILINEAR, fill=0),
    ]


class RandomSolarize(nn.Module):
    # a threshold drawn anew for every texture, in [32, 128] of 255
    def forward(self, image):
        return TF.solarize(image, int(torch.randint(32, 129, (1,))))


class PerlinAnomalyGenerator(nn.Module):
    # pastes an augmented texture into a Perlin-shaped region of each image:
    # out = image * (1 - mask) + beta * texture * mask + (1 - beta) * image * mask, beta drawn in blend_factor;
    # dual_mask: half of the masks are the union with a second, independent Perlin mask (GLASS)
    def __init__(self, textures, probability=0.5, blend_factor=(0.1, 1.0), augmentations=3, dual_mask=False):
        super().__init__()
        self.textures = textures
        self.probability = probability
        self.dual_mask = dual_mask
        self.blend_factor = tuple(blend_factor) if isinstance(blend_factor, (list, tuple)) else (blend_factor,) * 2
        self.augmentations = augmentations
        self.augmenters = create_texture_augmenters()

    def augment_texture(self, texture):
        chosen = torch.randperm(len(self.augmenters))[: self.augmentations].tolist()
        for index in chosen:
            texture = self.augmenters[index](texture)
        return texture

    def generate(self, image):
        height, width = image.shape[-2:]
        if float(torch.rand(1)) > self.probability:
            return image, torch.zeros(1, height, width, device=image.device)
        _, mask = generate_perlin_mask(height, width)
        if self.dual_mask:
            _, second = generate_perlin_mask(height, width, attempts=1)
            if float(torch.rand(1)) > 0.5:
                mask = torch.maximum(mask, second)
        texture = self.augment_texture(self.textures.sample(height, width))
        texture = texture.to(image.device, image.dtype) / 255.0
        mask = mask.to(image.device, image.dtype)[None]
        low, high = self.blend_factor
        beta = low + float(torch.rand(1)) * (high - low)
        return image * (1 - mask) + beta * texture * mask + (1 - beta) * image * mask, mask

    def forward(self, images):
        pairs = [self.generate(image) for image in images]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
