# src/defectvad/data/synthetic.py
from pathlib import Path

from defectvad.data.mvtec import MVTecDataset
from defectvad.data.synthetic_generator import SYNTHETIC_CATEGORIES, generate_synthetic_dataset
from defectvad.errors import DatasetError


class SyntheticDataset(MVTecDataset):
    CATEGORIES = SYNTHETIC_CATEGORIES
    NAME = "synthetic"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False):
        if not (Path(root) / str(category)).exists():
            if category not in SYNTHETIC_CATEGORIES:
                raise DatasetError(f"unknown synthetic category '{category}'; "
                                   f"choose from {', '.join(SYNTHETIC_CATEGORIES)}")
            # the data never depends on the run's seed, only k_shot picks do
            generate_synthetic_dataset(root, [category], seed=0)
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)
