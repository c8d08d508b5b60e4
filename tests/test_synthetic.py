# tests/test_synthetic.py
import hashlib

import numpy as np
import pytest
from PIL import Image

from defectvad.data.synthetic import SyntheticDataset
from defectvad.data.synthetic_generator import (CATEGORY_SPECS, MIN_DEFECT_PIXELS, SYNTHETIC_CATEGORIES,
                                                generate_synthetic_dataset)
from defectvad.data.transforms import ImageTransform
from defectvad.errors import DatasetError

CATEGORY = SYNTHETIC_CATEGORIES[0]
SMALL = ImageTransform(32, normalize=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    # the data set writes its category on first use
    test = SyntheticDataset(root, CATEGORY, "test", SMALL)
    return root, test


def read_array(path):
    with Image.open(path) as image:
        return np.asarray(image), image.size, image.mode


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_categories_mix_textures_and_objects():
    assert SYNTHETIC_CATEGORIES == ("tiles", "weave", "marble", "disc", "tablet", "gear")
    assert SyntheticDataset.CATEGORIES == SYNTHETIC_CATEGORIES
    assert all(len(defects) == 4 for _, defects in CATEGORY_SPECS.values())


def test_generation_on_first_use_writes_the_mvtec_layout(generated):
    root, test = generated
    train = SyntheticDataset(root, CATEGORY, "train", SMALL)
    assert len(train) == 40 and len(test) == 30
    assert sorted({s["defect_type"] for s in test.samples}) == ["color", "crack", "good", "hole", "stain"]
    assert sum(s["label"] for s in test.samples) == 20
    _, size, mode = read_array(root / CATEGORY / "train" / "good" / "000.png")
    assert size == (256, 256) and mode == "RGB"
    assert not list(root.glob(".*tmp*"))


def test_masks_are_exact_binary_and_only_on_defects(generated):
    root, test = generated
    for sample in test.samples:
        if sample["label"] == 0:
            assert sample["mask_path"] is None
            continue
        mask = read_array(sample["mask_path"])[0]
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert MIN_DEFECT_PIXELS <= (mask > 0).sum() <= 0.1 * mask.size
    item = next(test[i] for i in range(len(test)) if test.samples[i]["label"] == 1)
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum().item() > 0


def test_normal_images_differ_from_each_other(generated):
    root, _ = generated
    first, second = (read_array(root / CATEGORY / "train" / "good" / f"00{i}.png")[0].astype(float)
                     for i in range(2))
    assert np.abs(first - second).mean() > 2


def test_generation_is_byte_identical_for_a_seed(generated, tmp_path):
    root, _ = generated
    generate_synthetic_dataset(tmp_path, [CATEGORY], seed=0)
    assert tree_digest(tmp_path / CATEGORY) == tree_digest(root / CATEGORY)


def test_existing_category_is_kept_and_unknown_ones_rejected(generated, tmp_path):
    root, _ = generated
    before = tree_digest(root / CATEGORY)
    generate_synthetic_dataset(root, [CATEGORY], seed=5)
    assert tree_digest(root / CATEGORY) == before
    with pytest.raises(DatasetError, match="unknown synthetic categories: lava; choose from tiles"):
        generate_synthetic_dataset(tmp_path, ["lava"])
    with pytest.raises(DatasetError, match="unknown synthetic category 'lava'.*tiles, weave"):
        SyntheticDataset(tmp_path, "lava", "train", SMALL)
