# tests/test_categories.py
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from defectvad.data.categories import CategoryUnion, build_dataset, resolve_categories
from defectvad.data.mvtec import MVTecDataset
from defectvad.data.synthetic_generator import SYNTHETIC_CATEGORIES
from defectvad.data.transforms import ImageTransform
from defectvad.errors import ConfigError
from defectvad.experiment import run_experiment
from defectvad.metrics.evaluation import compute_metrics
from defectvad.metrics.per_category import compute_category_metrics, mean_metrics
from defectvad.records import METRIC_KEYS
from fakes import write_image, write_mask

ROOT = Path(__file__).resolve().parents[1]
SMALL = ImageTransform((16, 16), normalize=False)


def write_category(root, category, train_count, shade):
    # normal images of one shade; anomalous ones carry a bright square, with its mask
    base = root / category
    for index in range(train_count):
        write_image(base / "train" / "good" / f"{index:03d}.png", shade + index)
    for index in range(2):
        write_image(base / "test" / "good" / f"{index:03d}.png", shade + index)
        write_image(base / "test" / "crack" / f"{index:03d}.png", 250 - 40 * index)
        write_mask(base / "ground_truth" / "crack" / f"{index:03d}_mask.png")
    return base


def dataset_cfg(root, category, target="defectvad.data.mvtec.MVTecDataset"):
    return OmegaConf.create({"_target_": target, "root": str(root), "category": category, "k_shot": None})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_category(root, "bottle", 5, 60)
    write_category(root, "cable", 3, 120)
    return root


def test_union_train_set_joins_each_category_and_tags_samples(tree):
    train = build_dataset(dataset_cfg(tree, ["cable", "bottle"]), split="train", transform=SMALL, seed=0)
    assert isinstance(train, CategoryUnion) and len(train) == 8
    assert [sample["category"] for sample in train.samples] == ["cable"] * 3 + ["bottle"] * 5
    bottle = MVTecDataset(tree, "bottle", "train", SMALL)
    assert torch.equal(train[3]["image"], bottle[0]["image"]) and train[3]["image_path"] == bottle[0]["image_path"]
    # k_shot picks within each category
    picked = build_dataset(dataset_cfg(tree, ["cable", "bottle"]), split="train", transform=SMALL, seed=0, k_shot=2)
    assert [sample["category"] for sample in picked.samples] == ["cable"] * 2 + ["bottle"] * 2
    test = build_dataset(dataset_cfg(tree, ["bottle", "cable"]), split="test", transform=SMALL, seed=0)
    assert len(test) == 8 and sum(sample["label"] for sample in test.samples) == 4
    # one category stays the plain data set
    assert type(build_dataset(dataset_cfg(tree, "bottle"), split="train", transform=SMALL, seed=0)) is MVTecDataset


def test_all_expands_to_the_official_list_and_unknown_names_are_refused():
    assert resolve_categories(dataset_cfg("x", "all", "defectvad.data.synthetic.SyntheticDataset")) == list(
        SYNTHETIC_CATEGORIES)
    assert resolve_categories(dataset_cfg("x", "all"))[:2] == ["bottle", "cable"]
    assert resolve_categories(dataset_cfg("x", [1, 3], "defectvad.data.btad.BTADDataset")) == ["01", "03"]
    assert resolve_categories(dataset_cfg("x", "bottle")) is None
    with pytest.raises(ConfigError, match="unknown MVTec AD categories: bottel; choose from bottle, cable"):
        resolve_categories(dataset_cfg("x", ["bottel", "cable"]))
    with pytest.raises(ConfigError, match="folder has no official category list"):
        resolve_categories(dataset_cfg("x", "all", "defectvad.data.folder.FolderDataset"))


def test_category_metrics_equal_metrics_of_each_category_alone_and_their_mean():
    generator = torch.Generator().manual_seed(0)
    count = 12
    samples = [{"image_path": f"{name}/{index}.png", "category": name}
               for name in ("tiles", "disc") for index in range(count)]
    order = torch.randperm(2 * count, generator=generator)
    labels = torch.tensor([index % 2 for index in range(2 * count)])[order]
    masks = torch.zeros(2 * count, 1, 8, 8)
    masks[labels == 1, :, 2:5, 2:5] = 1
    predictions = {"image_path": [samples[i]["image_path"] for i in order.tolist()], "label": labels,
                   "pred_score": torch.rand(2 * count, generator=generator) + 0.3 * labels,
                   "anomaly_map": torch.rand(2 * count, 1, 8, 8, generator=generator) + 0.5 * masks,
                   "mask": masks, "has_masks": True}
    per_category = compute_category_metrics(predictions, samples, 0.3)
    assert list(per_category) == ["tiles", "disc"]
    for name in ("tiles", "disc"):
        rows = [i for i, path in enumerate(predictions["image_path"]) if path.startswith(name)]
        alone = compute_metrics(predictions["pred_score"][rows], labels[rows], predictions["anomaly_map"][rows, 0],
                                masks[rows, 0], fpr_limit=0.3)
        assert {key: per_category[name][key] for key in METRIC_KEYS} == {key: alone[key] for key in METRIC_KEYS}
        assert per_category[name]["image_auroc"] == pytest.approx(
            roc_auc_score(labels[rows].numpy(), predictions["pred_score"][rows].numpy()))
    mean = mean_metrics(per_category)
    for key in METRIC_KEYS:
        assert mean[key] == pytest.approx((per_category["tiles"][key] + per_category["disc"][key]) / 2)


def test_one_run_over_two_categories_records_each_category_and_the_mean(tree, tmp_path):
    overrides = ["model=patchcore", "dataset=mvtec", f"dataset.root={tree}", "dataset.category=[bottle,cable]",
                 "hardware=cpu", "hardware.threads=1", "transform.image_size=[32,32]", "trainer.progress_bar=false",
                 "backbone=resnet18", "backbone.pretrained=false", "evaluation.save_images=false",
                 "evaluation.efficiency=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    record = run_experiment(cfg, tmp_path, {"model": "patchcore", "dataset": "mvtec"}, overrides, ROOT)
    assert record["run"]["category"] == ["bottle", "cable"] and record["evaluation"]["train_images"] == 8
    per_category = record["metrics_per_category"]
    assert list(per_category) == ["bottle", "cable"]
    for key in METRIC_KEYS:
        assert record["metrics"][key] == pytest.approx(np.mean([per_category[name][key] for name in per_category]))
    with open(tmp_path / "test_scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["category"] for row in rows} == {"bottle", "cable"} and len(rows) == 8
    for name in ("bottle", "cable"):
        mine = [row for row in rows if row["category"] == name]
        assert all(Path(row["image_path"]).parts[-4] == name for row in mine)
        expected = roc_auc_score([int(row["label"]) for row in mine], [float(row["pred_score"]) for row in mine])
        assert per_category[name]["image_auroc"] == pytest.approx(expected)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics_per_category"] == per_category



def test_a_single_run_over_several_categories_names_its_folder_by_them():
    from omegaconf import OmegaConf

    from defectvad.sweeps.folders import category_name

    assert category_name(OmegaConf.create({"c": ["tiles", "disc"]}).c) == "tiles+disc"
    assert category_name("all") == "all"
    assert category_name(1) == "1"
