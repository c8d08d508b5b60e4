# src/defectvad/data/mvtec_ad2.py
# MVTec AD 2: <category>/train/good, validation/good, test_public/{good,bad,ground_truth/bad/<stem>_mask.png};
# test_private and test_private_mixed hold images without labels or masks, for the evaluation server only
from defectvad.data.base import create_sample, find_category_dir
from defectvad.data.images import find_mask, index_images_by_stem, list_images
from defectvad.data.validation_good import ValidationGoodDataset, check_held_out_split
from defectvad.errors import ConfigError, DatasetError

TEST_SETS = {"public": "test_public", "private": "test_private", "private_mixed": "test_private_mixed"}
PRIVATE_TOOL = "tools/mvtec_ad2_submission.py"


def describe_layout(category_dir):
    return (f"MVTec AD 2 expects {category_dir}/train/good, {category_dir}/validation/good and "
            f"{category_dir}/test_public/good, test_public/bad, test_public/ground_truth/bad")


def list_private_images(root, category, test_set):
    # the unlabelled images of test_private or test_private_mixed, which only the evaluation server judges
    if test_set not in ("private", "private_mixed"):
        raise ConfigError(f"the private test sets are private and private_mixed, got {test_set!r}")
    category_dir = find_category_dir(root, category, MVTecAD2Dataset.NAME)
    folder = category_dir / TEST_SETS[test_set]
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} not found; MVTec AD 2 keeps the unlabelled test images of "
                           f"{category} in {category_dir}/test_private and {category_dir}/test_private_mixed")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no images in {folder}")
    return images


class MVTecAD2Dataset(ValidationGoodDataset):
    CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
    NAME = "MVTec AD 2"

    def __init__(self, root, category, split, transform=None, k_shot=None, seed=0, max_image_pixels=None,
                 resize_masks=False, test_set="public", held_out_split=None):
        check_held_out_split(held_out_split)
        if test_set not in TEST_SETS:
            raise ConfigError(f"dataset.test_set must be one of: {', '.join(TEST_SETS)}; got {test_set!r}")
        if test_set != "public" and split == "test":
            raise ConfigError(f"MVTec AD 2's {TEST_SETS[test_set]} has no labels or masks, so a run cannot judge it: "
                              f"train and test on test_set=public, then write the server's maps for "
                              f"{TEST_SETS[test_set]} with {PRIVATE_TOOL} <run dir> <dataset root>")
        self.test_set = test_set
        super().__init__(root, category, split, transform, k_shot, seed, max_image_pixels, resize_masks)

    def collect_samples(self):
        category_dir = find_category_dir(self.root, self.category, self.NAME)
        if self.split == "train":
            return self.collect_normal_samples(category_dir, describe_layout(category_dir))
        test_dir = category_dir / TEST_SETS[self.test_set]
        samples = []
        for kind in ("good", "bad"):
            if not (test_dir / kind).is_dir():
                raise DatasetError(f"folder {test_dir / kind} not found; {describe_layout(category_dir)}")
        samples += [create_sample(p, None, 0, "good") for p in list_images(test_dir / "good")]
        mask_dir = test_dir / "ground_truth" / "bad"
        masks = index_images_by_stem(mask_dir)
        for image_path in list_images(test_dir / "bad"):
            mask_path = find_mask(masks, image_path.stem, ("_mask",))
            if mask_path is None:
                raise DatasetError(f"test image {image_path} has no mask; expected {mask_dir / image_path.stem}"
                                   f"_mask.png")
            samples.append(create_sample(image_path, mask_path, 1, "bad"))
        return samples
