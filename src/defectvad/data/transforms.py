# src/defectvad/data/transforms.py
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from defectvad.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, get_backbone
from defectvad.data.images import image_to_tensor
from defectvad.errors import ConfigError, DatasetError

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def to_size_pair(size, name):
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    try:
        pair = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise DatasetError(f"{name} must be a positive int or a pair [height, width], got {size!r}")
    return pair


def create_transform(settings, backbone, normalize):
    # settings: the config's transform group; a null mean, std or interpolation takes the backbone's own
    spec = get_backbone(backbone)
    return ImageTransform(settings.image_size, settings.center_crop, normalize,
                          settings.get("mean") or spec.mean, settings.get("std") or spec.std,
                          settings.get("interpolation") or spec.interpolation)


class ImageTransform:
    def __init__(self, image_size=(256, 256), center_crop=None, normalize=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"transform.interpolation must be one of: {', '.join(INTERPOLATIONS)}; "
                              f"got {interpolation!r}")
        self.image_size = image_size
        self.center_crop = center_crop
        self.normalize = normalize
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation

    def __call__(self, image, mask=None):
        size = to_size_pair(self.image_size, "image_size")
        crop = None if self.center_crop is None else to_size_pair(self.center_crop, "center_crop")
        if crop is not None and (crop[0] > size[0] or crop[1] > size[1]):
            raise DatasetError(f"center_crop {crop} is larger than image_size {size}; make it smaller")

        # read_image gives the float (3, H, W) tensor; a PIL image goes through the same conversion
        if not torch.is_tensor(image):
            image = image_to_tensor(image)
        image = F.resize(image, list(size), INTERPOLATIONS[self.interpolation], antialias=True)
        if mask is None:
            mask = torch.zeros(1, *size)
        else:
            mask = F.pil_to_tensor(mask.convert("L"))
            mask = F.resize(mask, list(size), InterpolationMode.NEAREST)
        if crop is not None:
            image = F.center_crop(image, list(crop))
            mask = F.center_crop(mask, list(crop))
        if self.normalize:
            image = F.normalize(image, self.mean, self.std)
        return image, (mask > 0).float()
