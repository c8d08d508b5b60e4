# src/defectvad/data/mvtec.py
from defectvad.data.base import AnomalyDataset, find_category_dir
from defectvad.data.tree_layout import collect_tree_samples


class MVTecDataset(AnomalyDataset):
    CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                  "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
    NAME = "MVTec AD"

    def collect_samples(self):
        category_dir = find_category_dir(self.root, self.category, self.NAME)
        return collect_tree_samples(category_dir, self.split, "good", ("_mask",), self.NAME)
