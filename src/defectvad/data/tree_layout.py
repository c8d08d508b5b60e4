# src/defectvad/data/tree_layout.py
# the MVTec-style tree: train/<normal>, test/<defect type>, ground_truth/<defect type>
from defectvad.data.base import create_sample
from defectvad.data.images import find_mask, index_images_by_stem, list_images
from defectvad.errors import DatasetError


def collect_tree_samples(category_dir, split, normal_name, mask_suffixes, dataset_name):
    split_dir = category_dir / split
    layout = (f"{dataset_name} expects {category_dir}/train/{normal_name}, "
              f"{category_dir}/test/<defect type> and {category_dir}/ground_truth/<defect type>")
    if not split_dir.is_dir():
        raise DatasetError(f"folder {split_dir} not found; {layout}")
    if split == "train":
        normal_dir = split_dir / normal_name
        if not normal_dir.is_dir():
            raise DatasetError(f"folder {normal_dir} not found; {layout}")
        return [create_sample(p, None, 0, "good") for p in list_images(normal_dir)]

    samples = []
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if type_dir.name == normal_name:
            samples += [create_sample(p, None, 0, "good") for p in list_images(type_dir)]
            continue
        mask_dir = category_dir / "ground_truth" / type_dir.name
        masks = index_images_by_stem(mask_dir)
        for image_path in list_images(type_dir):
            mask_path = find_mask(masks, image_path.stem, mask_suffixes)
            if mask_path is None:
                expected = mask_dir / f"{image_path.stem}{mask_suffixes[0]}.png"
                raise DatasetError(f"test image {image_path} has no mask; expected {expected}")
            samples.append(create_sample(image_path, mask_path, 1, type_dir.name))
    return samples
