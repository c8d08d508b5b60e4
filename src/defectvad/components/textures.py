# src/defectvad/components/textures.py
import math
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from defectvad.components.perlin import generate_perlin_noise
from defectvad.data.images import is_image_file, read_image
from defectvad.errors import ConfigError, DatasetError

ANOMALY_SOURCES = ("dtd", "synthetic")


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


def create_textures(anomaly_source, anomaly_source_path, model_name):
    # the texture source of a model that pastes textures into images (model.anomaly_source)
    if anomaly_source == "synthetic":
        return SyntheticTextures()
    if anomaly_source != "dtd":
        raise ConfigError(f"model.anomaly_source must be one of: {', '.join(ANOMALY_SOURCES)}; got '{anomaly_source}'")
    textures = TextureFolder(anomaly_source_path) if Path(anomaly_source_path).is_dir() else None
    if textures is None or len(textures) == 0:
        raise DatasetError(
            f"{model_name}'s anomaly textures were not found: no images in {anomaly_source_path}; download the "
            "Describable Textures Dataset (https://www.robots.ox.ac.uk/~vgg/data/dtd/) and unpack it there, point "
            "model.anomaly_source_path to it, or set model.anomaly_source=synthetic to use generated textures"
        )
    return textures


def describe_textures(anomaly_source, anomaly_source_path, textures):
    # what metrics.json records of the texture source
    return {
        "anomaly_source": anomaly_source,
        "anomaly_source_path": str(anomaly_source_path) if anomaly_source == "dtd" else None,
        "textures": len(textures) if anomaly_source == "dtd" else "generated: " + ", ".join(SyntheticTextures.kinds),
    }
