# src/defectvad/data/panel.py
from pathlib import Path

from defectvad.data.mvtec import MVTecDataset
from defectvad.data.panel_generator import PANEL_CATEGORIES, generate_panel_dataset, read_defects
from defectvad.errors import DatasetError


class PanelDataset(MVTecDataset):
    CATEGORIES = PANEL_CATEGORIES
    NAME = "panel"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False, generator_seed=0):
        if category not in PANEL_CATEGORIES:
            raise DatasetError(f"unknown panel category '{category}'; choose from {', '.join(PANEL_CATEGORIES)}")
        if isinstance(generator_seed, bool) or not isinstance(generator_seed, int) or generator_seed < 0:
            raise DatasetError(f"dataset.generator_seed must be a non-negative int, got {generator_seed!r}")
        # written on first use; the run's seed only picks k_shot images
        generate_panel_dataset(root, [category], seed=generator_seed)
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)
        # ground truth of each defect image by its path: type, level, contrast, area, box, centroid
        category_dir = Path(root) / category
        self.defects = {str(category_dir / row["image"]): row for row in read_defects(category_dir)}
