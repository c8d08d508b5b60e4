# src/defectvad/components/textures.py
import math
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from defectvad.components.perlin import generate_perlin_noise
from defectvad.data.images import is_image_file, read_image


class TextureFolder:
    # every image under a folder (e.g. the Describable Textures Dataset), read on demand as uint8 (3, H, W)
    def __init__(self, root):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if is_image_file(p))

    def __len__(self):
        return len(self.files)

    def sample(self, height, width):
        path = self.files[int(torch.randint(len(self.files), (1,)))]
        # by the datasets' pixel rule (16-bit textures keep their range), then 8 bits as anomalib's augmentation takes
        texture = (255 * read_image(path)).round().to(torch.uint8)
        return TF.resize(texture, [height, width], InterpolationMode.BILINEAR, antialias=True)


class SyntheticTextures:
    # procedural stand-ins for DTD: Perlin colour fields, stripes and checkerboards in random colours
    kinds = ("perlin", "stripes", "checker")

    def __len__(self):
        return len(self.kinds)

    def sample(self, height, width):
        kind = self.kinds[int(torch.randint(len(self.kinds), (1,)))]
        colours = torch.rand(2, 3, 1, 1)
        if kind == "perlin":
            texture = torch.stack([generate_perlin_noise(height, width) for _ in range(3)])
            low, high = texture.amin((1, 2), keepdim=True), texture.amax((1, 2), keepdim=True)
            texture = (texture - low) / (high - low + 1e-6)
        else:
            angle = float(torch.rand(1)) * math.pi
            frequency = 2 + float(torch.rand(1)) * 14
            y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
            along = torch.sin(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)))
            if kind == "checker":
                across = torch.sin(2 * math.pi * frequency * (-x * math.sin(angle) + y * math.cos(angle)))
                along = torch.sign(along * across)
            weight = (along + 1)[None] / 2
            texture = colours[0] * weight + colours[1] * (1 - weight)
        return (255 * texture.clamp(0, 1)).round().to(torch.uint8)
