# src/defectvad/data/btad.py
from defectvad.data.base import AnomalyDataset, find_category_dir
from defectvad.data.tree_layout import collect_tree_samples


class BTADDataset(AnomalyDataset):
    CATEGORIES = ("01", "02", "03")
    NAME = "BTAD"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False):
        # YAML reads 01 as the int 1
        if isinstance(category, int) and not isinstance(category, bool):
            category = f"{category:02d}"
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)

    def collect_samples(self):
        category_dir = find_category_dir(self.root, self.category, self.NAME)
        return collect_tree_samples(category_dir, self.split, "ok", ("", "_mask"), self.NAME)
