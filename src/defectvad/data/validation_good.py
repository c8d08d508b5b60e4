# src/defectvad/data/validation_good.py
# Data sets that ship normal images in <category>/validation/good (MVTec AD 2, MVTec LOCO AD): split "validation"
# reads them, normal images none of the training sees; dataset.held_out_split=validation makes them the run's
# held-out normals (normal-only threshold, trainer.validation=holdout)
from defectvad.data.base import AnomalyDataset, create_sample
from defectvad.data.images import list_images
from defectvad.errors import ConfigError, DatasetError


def check_held_out_split(held_out_split):
    if held_out_split not in (None, "validation"):
        raise ConfigError(f"dataset.held_out_split must be validation (validation/good as held-out normal images) or "
                          f"null; got {held_out_split!r}")


class ValidationGoodDataset(AnomalyDataset):
    def __init__(self, root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks):
        # the validation split is collected as a train split of the validation folder, never cut to k_shot
        held_out = split == "validation"
        self.normal_folder = "validation" if held_out else "train"
        super().__init__(root, category, "train" if held_out else split, transform, None if held_out else k_shot,
                         seed, max_image_pixels, resize_masks)
        self.split = split

    def collect_normal_samples(self, category_dir, layout):
        folder = category_dir / self.normal_folder / "good"
        if not folder.is_dir():
            raise DatasetError(f"folder {folder} not found; {layout}")
        return [create_sample(p, None, 0, "good") for p in list_images(folder)]
