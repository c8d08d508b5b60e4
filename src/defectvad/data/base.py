# src/defectvad/data/base.py
import random
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from PIL import Image

from defectvad.data.images import check_max_image_pixels, read_image, read_image_size, read_mask
from defectvad.data.transforms import ImageTransform
from defectvad.errors import ConfigError, DatasetError

SPLITS = ("train", "test")


def create_sample(image_path, mask_path, label, defect_type):
    return {
        "image_path": str(image_path),
        "mask_path": None if mask_path is None else str(mask_path),
        "label": int(label),
        "defect_type": defect_type,
    }


def find_category_dir(root, category, dataset_name):
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset_name} data folder not found: {root}; set the dataset root to the "
                           f"folder that holds the category folders")
    category_dir = root / str(category)
    if category is None or not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found_text = ", ".join(found) if found else "none"
        raise DatasetError(f"{dataset_name} category '{category}' not found in {root}; "
                           f"categories found there: {found_text}")
    return category_dir


def select_k_shot(samples, k_shot, seed, where):
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 1:
        raise DatasetError(f"k_shot must be a positive int or null, got {k_shot!r}")
    if k_shot > len(samples):
        raise DatasetError(f"k_shot={k_shot} but only {len(samples)} normal training images in {where}; "
                           f"lower k_shot")
    picks = sorted(random.Random(seed).sample(range(len(samples)), k_shot))
    return [samples[i] for i in picks]


def has_same_aspect_ratio(size, other):
    # the smaller size's sides, scaled from the larger's by either ratio, land within one of its pixels
    (width, height), (other_width, other_height) = size, other
    cross = abs(height * other_width - other_height * width)
    return cross < max(width, other_width) and cross < max(height, other_height)


def check_mask_size(mask_size, image_size, mask_path, image_path, resize_masks):
    # (width, height) pairs; True when the mask must be resized to the image's size
    if mask_size == image_size:
        return False
    sizes = (f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} pixels (width x height) but its image "
             f"{image_path} is {image_size[0]}x{image_size[1]}")
    if not has_same_aspect_ratio(mask_size, image_size):
        raise DatasetError(f"{sizes}, another aspect ratio; give a mask of the image's size")
    if not resize_masks:
        raise DatasetError(f"{sizes}; give a mask of the image's size, or set dataset.resize_masks=true to "
                           f"resize it (nearest neighbour, same aspect ratio)")
    return True


class AnomalyDataset(Dataset):
    CATEGORIES = ()
    NAME = "dataset"
    has_masks = True

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False):
        if split not in SPLITS:
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.transform = ImageTransform() if transform is None else transform
        self.k_shot = k_shot
        self.seed = seed
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        if not isinstance(resize_masks, bool):
            raise ConfigError(f"dataset.resize_masks must be true or false, got {resize_masks!r}")
        self.resize_masks = resize_masks
        samples = sorted(self.collect_samples(), key=lambda s: s["image_path"])
        where = self.describe_location()
        if split == "train":
            samples = [s for s in samples if s["label"] == 0]
        if not samples:
            raise DatasetError(f"no {split} images found for {self.NAME} in {where}; "
                               f"check the dataset root and layout")
        if split == "train" and k_shot is not None:
            samples = select_k_shot(samples, k_shot, seed, where)
        self.samples = samples
        self.check_mask_sizes()

    def collect_samples(self):
        raise NotImplementedError

    def describe_location(self):
        return str(self.root / str(self.category))

    def check_mask_sizes(self):
        # from the files' headers, so that a wrong mask stops the run before training
        for sample in self.samples:
            if sample["mask_path"] is not None:
                image_size = read_image_size(sample["image_path"], "image", self.max_image_pixels)
                check_mask_size(read_image_size(sample["mask_path"], "mask", self.max_image_pixels), image_size,
                                sample["mask_path"], sample["image_path"], self.resize_masks)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.load_sample(self.samples[index])

    def load_sample(self, sample):
        image = read_image(sample["image_path"], self.max_image_pixels)
        image, mask = self.transform(image, self.load_mask(sample, (image.shape[2], image.shape[1])))
        return {
            "image": image,
            "label": sample["label"],
            "mask": mask,
            "image_path": sample["image_path"],
            "defect_type": sample["defect_type"],
        }

    def load_mask(self, sample, image_size):
        # the PIL mask at the image's (width, height), or None for a normal image
        if sample["mask_path"] is None:
            return None
        mask = read_mask(sample["mask_path"], self.max_image_pixels)
        if check_mask_size(mask.size, image_size, sample["mask_path"], sample["image_path"], self.resize_masks):
            mask = mask.resize(image_size, Image.NEAREST)
        return mask

    def load_full_resolution_mask(self, sample):
        # bool (height, width) at the image's own size, for pixel metrics at full resolution
        width, height = read_image_size(sample["image_path"], "image", self.max_image_pixels)
        mask = self.load_mask(sample, (width, height))
        return np.zeros((height, width), bool) if mask is None else np.asarray(mask) > 0
