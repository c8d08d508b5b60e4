# src/defectvad/data/folder.py
import random
from pathlib import Path

from defectvad.data.base import AnomalyDataset, create_sample
from defectvad.data.images import find_mask, index_images_by_stem, list_images
from defectvad.errors import DatasetError


class FolderDataset(AnomalyDataset):
    NAME = "folder"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, normal_dir="good",
                 abnormal_dir=None, mask_dir=None, normal_test_ratio=0.2, max_image_pixels=None, resize_masks=False,
                 object_name=None):
        self.normal_dir = normal_dir
        # what the images show, for models that name it in text prompts (WinCLIP)
        self.object_name = object_name
        self.abnormal_dir = abnormal_dir
        self.mask_dir = mask_dir
        self.normal_test_ratio = normal_test_ratio
        self.has_masks = mask_dir is not None
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)

    def describe_location(self):
        return str(self.resolve(self.normal_dir, "normal_dir"))

    def resolve(self, folder, name):
        path = Path(self.root) / folder
        if not path.is_dir():
            raise DatasetError(f"{name} folder not found: {path}; set {name} to a folder of images, "
                               f"relative to {self.root} or absolute")
        return path

    def collect_samples(self):
        if not Path(self.root).is_dir():
            raise DatasetError(f"folder data set root not found: {self.root}")
        ratio = self.normal_test_ratio
        if not 0 <= ratio < 1:
            raise DatasetError(f"normal_test_ratio must be in [0, 1), got {ratio}")
        normal_dir = self.resolve(self.normal_dir, "normal_dir")
        normal = list_images(normal_dir)
        if not normal:
            raise DatasetError(f"no normal images in {normal_dir}; put the good images there")
        held_out_count = min(int(round(len(normal) * ratio)), len(normal) - 1)
        held_out = set(random.Random(self.seed).sample(range(len(normal)), held_out_count))
        if self.split == "train":
            return [create_sample(p, None, 0, "good") for i, p in enumerate(normal) if i not in held_out]

        samples = [create_sample(p, None, 0, "good") for i, p in enumerate(normal) if i in held_out]
        if self.abnormal_dir is None:
            return samples
        abnormal_dir = self.resolve(self.abnormal_dir, "abnormal_dir")
        masks = {} if self.mask_dir is None else index_images_by_stem(self.resolve(self.mask_dir, "mask_dir"))
        for image_path in list_images(abnormal_dir):
            mask_path = None
            if self.mask_dir is not None:
                mask_path = find_mask(masks, image_path.stem, ("", "_mask"))
                if mask_path is None:
                    expected = Path(self.root) / self.mask_dir / f"{image_path.stem}.png"
                    raise DatasetError(f"abnormal image {image_path} has no mask; expected {expected} "
                                       f"(or set mask_dir to null)")
            samples.append(create_sample(image_path, mask_path, 1, abnormal_dir.name))
        return samples
