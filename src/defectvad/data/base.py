# src/defectvad/data/base.py
import random
from pathlib import Path

from torch.utils.data import Dataset

from defectvad.data.images import read_image, read_mask
from defectvad.data.transforms import ImageTransform
from defectvad.errors import DatasetError

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


class AnomalyDataset(Dataset):
    CATEGORIES = ()
    NAME = "dataset"
    has_masks = True

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0):
        if split not in SPLITS:
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.transform = ImageTransform() if transform is None else transform
        self.k_shot = k_shot
        self.seed = seed
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

    def collect_samples(self):
        raise NotImplementedError

    def describe_location(self):
        return str(self.root / str(self.category))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        image = read_image(sample["image_path"])
        mask = None if sample["mask_path"] is None else read_mask(sample["mask_path"])
        image, mask = self.transform(image, mask)
        return {
            "image": image,
            "label": sample["label"],
            "mask": mask,
            "image_path": sample["image_path"],
            "defect_type": sample["defect_type"],
        }
