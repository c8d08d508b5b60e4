# tests/test_benchmark_layouts.py
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.nn import functional as F

from defectvad.data.mvtec_ad2 import MVTecAD2Dataset, list_private_images
from defectvad.data.mvtec_loco import MVTecLocoDataset, read_defects_config
from defectvad.data.real_iad import RealIADDataset, find_object
from defectvad.data.transforms import ImageTransform
from defectvad.errors import ConfigError, DatasetError
from defectvad.inference.mvtec_ad2_submission import submission_paths, write_submission
from defectvad.metrics.spro import SproCurves
from fakes import write_image, write_mask

SMALL = ImageTransform((16, 16), normalize=False)


# MVTec AD 2

def write_mvtec_ad2(root, category="sheet_metal"):
    base = root / category
    for index in range(3):
        write_image(base / "train" / "good" / f"{index:03d}_regular.png", 100 + index)
    for index in range(2):
        write_image(base / "validation" / "good" / f"{index:03d}_regular.png", 90)
    write_image(base / "test_public" / "good" / "000_regular.png")
    for index in range(2):
        write_image(base / "test_public" / "bad" / f"{index:03d}_overexposed.png", 200)
        write_mask(base / "test_public" / "ground_truth" / "bad" / f"{index:03d}_overexposed_mask.png")
    for folder in ("test_private", "test_private_mixed"):
        for index in range(2):
            write_image(base / folder / f"{index:03d}_mixed.png", 60 + 40 * index, size=(40, 24))
    return base


def test_mvtec_ad2_splits_labels_and_masks(tmp_path):
    write_mvtec_ad2(tmp_path)
    train = MVTecAD2Dataset(tmp_path, "sheet_metal", "train", SMALL)
    validation = MVTecAD2Dataset(tmp_path, "sheet_metal", "validation", SMALL)
    test = MVTecAD2Dataset(tmp_path, "sheet_metal", "test", SMALL)
    assert len(train) == 3 and all("/train/good/" in s["image_path"] for s in train.samples)
    assert len(validation) == 2 and all("/validation/good/" in s["image_path"] for s in validation.samples)
    assert [(s["label"], s["defect_type"]) for s in test.samples] == [(1, "bad"), (1, "bad"), (0, "good")]
    assert test.samples[0]["mask_path"].endswith("ground_truth/bad/000_overexposed_mask.png")
    # the 8..24 box of a 32 pixel mask is 4..12 at 16 pixels
    assert test[0]["mask"].sum().item() == 64 and test[2]["mask"].sum().item() == 0
    # k_shot picks among train/good only; validation stays whole
    assert len(MVTecAD2Dataset(tmp_path, "sheet_metal", "validation", SMALL, k_shot=1)) == 2
    assert len(MVTecAD2Dataset.CATEGORIES) == 8
    assert [p.name for p in list_private_images(tmp_path, "sheet_metal", "private_mixed")] == \
        ["000_mixed.png", "001_mixed.png"]


def test_mvtec_ad2_wrong_layouts_are_named(tmp_path):
    base = write_mvtec_ad2(tmp_path)
    (base / "test_public" / "ground_truth" / "bad" / "001_overexposed_mask.png").unlink()
    with pytest.raises(DatasetError, match="001_overexposed.png has no mask; expected .*bad/001_overexposed_mask.png"):
        MVTecAD2Dataset(tmp_path, "sheet_metal", "test", SMALL)
    with pytest.raises(DatasetError, match="'can' not found.*categories found there: sheet_metal"):
        MVTecAD2Dataset(tmp_path, "can", "train", SMALL)
    for path in (base / "validation" / "good").iterdir():
        path.unlink()
    (base / "validation" / "good").rmdir()
    with pytest.raises(DatasetError, match="validation/good not found; MVTec AD 2 expects .*test_public/good"):
        MVTecAD2Dataset(tmp_path, "sheet_metal", "validation", SMALL)
    with pytest.raises(ConfigError, match="test_private has no labels.*tools/mvtec_ad2_submission.py"):
        MVTecAD2Dataset(tmp_path, "sheet_metal", "test", SMALL, test_set="private")
    with pytest.raises(ConfigError, match="public, private, private_mixed"):
        MVTecAD2Dataset(tmp_path, "sheet_metal", "test", SMALL, test_set="hidden")
    with pytest.raises(ConfigError, match="held_out_split must be validation .* or null; got 'val'"):
        MVTecAD2Dataset(tmp_path, "sheet_metal", "train", SMALL, held_out_split="val")


class MeanMap(torch.nn.Module):
    # a stand-in model: the map is the mean of the input's channels, the score its largest value
    def forward(self, x):
        anomaly_map = x.mean(dim=1, keepdim=True)
        return {"pred_score": anomaly_map.amax(dim=(1, 2, 3)), "anomaly_map": anomaly_map}


def test_mvtec_ad2_submission_layout_and_values(tmp_path):
    write_mvtec_ad2(tmp_path / "data")
    run = SimpleNamespace(model=MeanMap(), transform=SMALL, normalize=False, max_image_pixels=None,
                          device=torch.device("cpu"), precision="fp32", tiler=None)
    out = tmp_path / "submission"
    counts = write_submission(run, tmp_path / "data", "sheet_metal", ["private", "private_mixed"], out, 0.3, 2, [])
    assert counts == {"private": 2, "private_mixed": 2}
    for test_set, folder in (("private", "test_private"), ("private_mixed", "test_private_mixed")):
        for index, value in enumerate((60, 100)):
            image = tmp_path / "data" / "sheet_metal" / folder / f"{index:03d}_mixed.png"
            tiff_path, png_path = submission_paths(out, "sheet_metal", test_set, image)
            assert tiff_path == out / "anomaly_images" / "sheet_metal" / folder / f"{index:03d}_mixed.tiff"
            assert png_path == out / "anomaly_images_thresholded" / "sheet_metal" / folder / f"{index:03d}_mixed.png"
            written = tifffile.imread(tiff_path)
            # 2-D float16 at the image's own size (24 rows, 40 columns), the model's 16x16 map resized bilinearly
            assert written.dtype == np.float16 and written.shape == (24, 40)
            expected = (value + value // 2 + 30) / 3 / 255
            assert np.allclose(written.astype(np.float32), expected, atol=1e-3)
            thresholded = np.asarray(Image.open(png_path))
            assert thresholded.shape == (24, 40) and set(np.unique(thresholded)) == {255 if expected >= 0.3 else 0}


# MVTec LOCO AD

DEFECTS = [
    {"defect_name": "missing_item", "pixel_value": 1, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "extra_item", "pixel_value": 2, "saturation_threshold": 20, "relative_saturation": False},
    {"defect_name": "scratch", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
]


def write_loco(root, category="pushpins"):
    base = root / category
    for index in range(3):
        write_image(base / "train" / "good" / f"{index:03d}.png", 100 + index)
    write_image(base / "validation" / "good" / "000.png", 90)
    write_image(base / "test" / "good" / "000.png", 10)
    write_image(base / "test" / "good" / "001.png", 20)
    # a logical anomaly with two defects (two mask files, their own pixel values), a structural one with one
    write_image(base / "test" / "logical_anomalies" / "000.png", 200)
    write_mask(base / "ground_truth" / "logical_anomalies" / "000" / "000.png", (0, 0, 8, 8), value=1)
    write_mask(base / "ground_truth" / "logical_anomalies" / "000" / "001.png", (20, 20, 30, 26), value=2)
    write_image(base / "test" / "structural_anomalies" / "000.png", 220)
    write_mask(base / "ground_truth" / "structural_anomalies" / "000" / "000.png", (8, 8, 24, 24), value=255)
    (base / "defects_config.json").write_text(json.dumps(DEFECTS))
    return base


def test_mvtec_loco_layout_masks_and_defects(tmp_path):
    write_loco(tmp_path)
    assert len(MVTecLocoDataset(tmp_path, "pushpins", "train", SMALL)) == 3
    assert len(MVTecLocoDataset(tmp_path, "pushpins", "validation", SMALL)) == 1
    test = MVTecLocoDataset(tmp_path, "pushpins", "test", ImageTransform((32, 32), normalize=False))
    assert [(s["label"], s["defect_type"]) for s in test.samples] == \
        [(0, "good"), (0, "good"), (1, "logical_anomalies"), (1, "structural_anomalies")]
    assert [len(s.get("mask_files", [])) for s in test.samples] == [0, 0, 2, 1]
    # the image's mask is the union of its defects: 8x8 + 10x6 pixels
    assert test[2]["mask"].sum().item() == 64 + 60
    assert test.load_full_resolution_mask(test.samples[3]).sum() == 256
    assert test.defects[2]["saturation_threshold"] == 20 and len(MVTecLocoDataset.CATEGORIES) == 5


def test_mvtec_loco_wrong_layouts_are_named(tmp_path):
    base = write_loco(tmp_path)
    with pytest.raises(DatasetError, match="'juice_bottle' not found.*categories found there: pushpins"):
        MVTecLocoDataset(tmp_path, "juice_bottle", "test", SMALL)
    (base / "ground_truth" / "structural_anomalies" / "000" / "000.png").unlink()
    with pytest.raises(DatasetError, match="structural_anomalies/000.png has no mask; expected .*structural_anomalies/"
                                           "000/000.png"):
        MVTecLocoDataset(tmp_path, "pushpins", "test", SMALL)
    (base / "ground_truth" / "structural_anomalies" / "000").rmdir()
    (base / "test" / "structural_anomalies" / "000.png").unlink()
    (base / "test" / "structural_anomalies").rmdir()
    with pytest.raises(DatasetError, match="test/structural_anomalies not found; MVTec LOCO AD expects"):
        MVTecLocoDataset(tmp_path, "pushpins", "test", SMALL)
    with pytest.raises(DatasetError, match="defects_config.json not found"):
        read_defects_config(tmp_path / "defects_config.json")
    for entry, message in (({"defect_name": "a", "pixel_value": 1}, "must have the keys"),
                           ({**DEFECTS[0], "saturation_threshold": 3}, "a relative saturation_threshold is a share"),
                           ({**DEFECTS[1], "saturation_threshold": 2.5}, "an absolute saturation_threshold is a whole"),
                           ({**DEFECTS[0], "pixel_value": 0}, "pixel_value must be an integer in 1..255")):
        (tmp_path / "defects_config.json").write_text(json.dumps([entry]))
        with pytest.raises(DatasetError, match=message):
            read_defects_config(tmp_path / "defects_config.json")


def test_mvtec_loco_mask_value_missing_from_the_config(tmp_path):
    base = write_loco(tmp_path)
    (base / "defects_config.json").write_text(json.dumps(DEFECTS[:2]))
    test = MVTecLocoDataset(tmp_path, "pushpins", "test", SMALL)
    predictions = {"image_path": [s["image_path"] for s in test.samples],
                   "anomaly_map": torch.zeros(4, 1, 16, 16), "pred_score": torch.zeros(4)}
    with pytest.raises(DatasetError, match="pixel value 255, which defects_config.json does not list \\(values there: "
                                           "1, 2\\)"):
        test.compute_extra_metrics(predictions)


def test_mvtec_loco_spro_at_full_and_at_model_resolution(tmp_path):
    base = write_loco(tmp_path)
    test = MVTecLocoDataset(tmp_path, "pushpins", "test", ImageTransform((16, 16), normalize=False))
    rng = np.random.default_rng(0)
    # maps at the model's 16x16: logical image, structural image, two good images
    maps = torch.from_numpy((rng.integers(0, 30, (4, 1, 16, 16)) / 8).astype(np.float32))
    predictions = {"image_path": [s["image_path"] for s in test.samples], "anomaly_map": maps,
                   "pred_score": torch.tensor([0.1, 0.2, 0.3, 0.15])}
    result = test.compute_extra_metrics(predictions)
    spro = result["spro"]
    # at 16x16 the masks halve: defect 1 (relative 0.5) has 16 pixels, saturated at 8; defect 2 (absolute 20 pixels
    # of the 32x32 image) has 15 pixels, saturated at 20 / 4 = 5; the structural defect (relative 1.0) 64 pixels
    first = np.zeros((16, 16), bool)
    first[0:4, 0:4] = True
    second = np.zeros((16, 16), bool)
    second[10:13, 10:15] = True
    third = np.zeros((16, 16), bool)
    third[4:12, 4:12] = True
    curves = SproCurves()
    curves.add(maps[0, 0].numpy())
    curves.add(maps[1, 0].numpy())
    curves.add(maps[2, 0].numpy(), [(first, 8), (second, 5)], "logical_anomalies")
    curves.add(maps[3, 0].numpy(), [(third, 64)], "structural_anomalies")
    assert spro["logical_anomalies"] == pytest.approx(curves.area("logical_anomalies", 0.05))
    assert spro["structural_anomalies"] == pytest.approx(curves.area("structural_anomalies", 0.05))
    assert spro["mean"] == pytest.approx((spro["logical_anomalies"] + spro["structural_anomalies"]) / 2)
    assert spro["regions"] == {"logical_anomalies": 2, "structural_anomalies": 1} and spro["resolution"] == [16, 16]
    # image AUROC per type, each against the good images: logical 0.3 beats 0.1 and 0.2; structural 0.15 only 0.1
    assert result["image_auroc_by_type"] == {"logical_anomalies": 1.0, "structural_anomalies": 0.5, "mean": 0.75}
    # at full resolution the maps are resized to 32x32 and the thresholds are the config's own
    full = test.compute_extra_metrics(predictions, full_resolution=True)["spro"]
    big = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
    masks = [np.asarray(Image.open(base / "ground_truth" / kind / "000" / name)) > 0
             for kind, name in (("logical_anomalies", "000.png"), ("logical_anomalies", "001.png"),
                                ("structural_anomalies", "000.png"))]
    curves = SproCurves()
    curves.add(big[0, 0].numpy())
    curves.add(big[1, 0].numpy())
    curves.add(big[2, 0].numpy(), [(masks[0], 32), (masks[1], 20)], "logical_anomalies")
    curves.add(big[3, 0].numpy(), [(masks[2], 256)], "structural_anomalies")
    assert full["logical_anomalies"] == pytest.approx(curves.area("logical_anomalies", 0.05))
    assert full["structural_anomalies"] == pytest.approx(curves.area("structural_anomalies", 0.05))
    assert full["resolution"].startswith("full")


# Real-IAD

def write_real_iad(root, category="audiojack"):
    images = root / "realiad_256" / category
    train, test = [], []
    for sample in (1, 2):
        for view in ("C1", "C2"):
            path = f"OK/S000{sample}/{category}_000{sample}_OK_{view}_20231021.jpg"
            write_image(images / path, 100 + sample)
            train.append({"category": category, "anomaly_class": "OK", "image_path": path, "mask_path": None})
    for view in ("C1", "C2"):
        path = f"OK/S0003/{category}_0003_OK_{view}_20231022.jpg"
        write_image(images / path)
        test.append({"category": category, "anomaly_class": "OK", "image_path": path, "mask_path": None})
    # an anomalous object whose defect shows in view C1 only
    path = f"NG/BX/S0004/{category}_0004_NG_C1_20231023.jpg"
    write_image(images / path, 200)
    write_mask(images / path.replace(".jpg", "_mask.png"))
    test.append({"category": category, "anomaly_class": "BX", "image_path": path,
                 "mask_path": path.replace(".jpg", "_mask.png")})
    path = f"NG/BX/S0004/{category}_0004_NG_C2_20231023.jpg"
    write_image(images / path, 200)
    test.append({"category": category, "anomaly_class": "OK", "image_path": path, "mask_path": None})
    json_dir = root / "realiad_jsons" / "realiad_jsons"
    json_dir.mkdir(parents=True, exist_ok=True)
    content = {"meta": {"prefix": "", "normal_class": "OK"}, "train": train, "test": test}
    (json_dir / f"{category}.json").write_text(json.dumps(content))
    return content


def real_iad(root, split, **kwargs):
    return RealIADDataset(root, "audiojack", split, SMALL, image_dir="realiad_256", **kwargs)


def test_real_iad_json_splits_views_and_masks(tmp_path):
    write_real_iad(tmp_path)
    train = real_iad(tmp_path, "train")
    test = real_iad(tmp_path, "test")
    assert len(train) == 4 and {s["view"] for s in train.samples} == {"C1", "C2"}
    assert [(s["label"], s["defect_type"], s["object"], s["view"]) for s in test.samples] == [
        (1, "BX", "audiojack_0004_NG", "C1"), (0, "good", "audiojack_0004_NG", "C2"),
        (0, "good", "audiojack_0003_OK", "C1"), (0, "good", "audiojack_0003_OK", "C2")]
    assert test[0]["mask"].sum().item() == 64 and test[1]["mask"].sum().item() == 0
    assert len(RealIADDataset.CATEGORIES) == 30
    # ADEval's sample key from the file name; without it, the folder of the views
    assert find_object("NG/HS/S0102/toy_brick_0102_NG_C5_20231101.jpg") == "toy_brick_0102_NG"
    assert find_object("OK/S0001/img_1.jpg") == "OK/S0001"


def test_real_iad_object_metrics_take_the_largest_view(tmp_path):
    write_real_iad(tmp_path)
    test = real_iad(tmp_path, "test")
    paths = [s["image_path"] for s in test.samples]
    # per view the defect view (0.4) ranks below a normal view (0.5); per object the anomalous object's largest
    # view (0.9, its other view) ranks above the normal object's largest (0.5)
    predictions = {"image_path": paths, "pred_score": torch.tensor([0.4, 0.9, 0.5, 0.2]),
                   "label": torch.tensor([1, 0, 0, 0])}
    result = test.compute_extra_metrics(predictions)["object_metrics"]
    assert result["object_auroc"] == 1.0 and result["objects"] == 2 and result["anomalous_objects"] == 1
    assert result["views_per_object"] == {"min": 2, "max": 2}
    predictions["pred_score"] = torch.tensor([0.4, 0.3, 0.5, 0.2])
    assert test.compute_extra_metrics(predictions)["object_metrics"]["object_auroc"] == 0.0
    assert real_iad(tmp_path, "test", setting="single_view").compute_extra_metrics(predictions) == {}


def test_real_iad_wrong_layouts_are_named(tmp_path):
    content = write_real_iad(tmp_path)
    with pytest.raises(DatasetError, match="category 'pcb' not found: no .*pcb.json; categories found there: "
                                           "audiojack"):
        RealIADDataset(tmp_path, "pcb", "train", SMALL, image_dir="realiad_256")
    with pytest.raises(DatasetError, match="split folder not found: .*realiad_jsons_sv"):
        real_iad(tmp_path, "train", json_dir="realiad_jsons/realiad_jsons_sv")
    with pytest.raises(DatasetError, match="image folder not found: .*realiad_1024/audiojack"):
        RealIADDataset(tmp_path, "audiojack", "train", SMALL)
    with pytest.raises(ConfigError, match="single_view, multi_view"):
        real_iad(tmp_path, "train", setting="five_view")
    json_path = tmp_path / "realiad_jsons" / "realiad_jsons" / "audiojack.json"
    broken = dict(content, test=[dict(content["test"][0], mask_path=None, anomaly_class="BX")])
    json_path.write_text(json.dumps(broken))
    with pytest.raises(DatasetError, match="0003_OK_C1_20231022.jpg has no mask"):
        real_iad(tmp_path, "test")
    json_path.write_text(json.dumps(dict(content, test=[{"image_path": "x.jpg"}])))
    with pytest.raises(DatasetError, match="test entry 0 must have the keys"):
        real_iad(tmp_path, "test")
    json_path.write_text(json.dumps(dict(content, test=[dict(content["test"][0], image_path="OK/none.jpg")])))
    with pytest.raises(DatasetError, match="image listed in .*audiojack.json not found: .*OK/none.jpg"):
        real_iad(tmp_path, "test")
    json_path.write_text(json.dumps({"meta": {}, "train": []}))
    with pytest.raises(DatasetError, match="must hold a 'test' list"):
        real_iad(tmp_path, "test")

