# tests/test_datasets.py
import numpy as np
import pytest
import torch
from PIL import Image

from defectvad.data.btad import BTADDataset
from defectvad.data.folder import FolderDataset
from defectvad.data.images import read_mask
from defectvad.data.loaders import create_dataloader
from defectvad.data.mvtec import MVTecDataset
from defectvad.data.transforms import ImageTransform
from defectvad.data.visa import VisaDataset
from defectvad.errors import DatasetError
from fakes import write_image, write_mask

SMALL = ImageTransform((16, 16), normalize=False)


def write_mvtec(root, category="bottle"):
    base = root / category
    for index in range(5):
        write_image(base / "train" / "good" / f"{index:03d}.png", 100 + index)
    write_image(base / "test" / "good" / "000.png")
    for defect in ("crack", "scratch"):
        for index in range(2):
            write_image(base / "test" / defect / f"{index:03d}.png", 200)
            write_mask(base / "ground_truth" / defect / f"{index:03d}_mask.png")
    return base


def test_mvtec_layout_labels_masks_and_paths(tmp_path):
    write_mvtec(tmp_path)
    train = MVTecDataset(tmp_path, "bottle", "train", SMALL)
    test = MVTecDataset(tmp_path, "bottle", "test", SMALL)
    assert len(train) == 5 and len(test) == 5
    assert [s["label"] for s in test.samples].count(1) == 4
    item = next(test[i] for i in range(len(test)) if test[i]["defect_type"] == "crack")
    assert item["image"].shape == (3, 16, 16)
    assert item["mask"].shape == (1, 16, 16)
    # the 8..24 box of a 32 pixel mask is 4..12 at 16 pixels, and masks stay binary after resizing
    assert item["mask"].sum().item() == 64
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    good = next(test[i] for i in range(len(test)) if test[i]["label"] == 0)
    assert good["mask"].sum().item() == 0
    assert item["image_path"].endswith(".png")
    assert MVTecDataset.CATEGORIES[0] == "bottle" and len(MVTecDataset.CATEGORIES) == 15


def test_mvtec_missing_mask_and_missing_category(tmp_path):
    base = write_mvtec(tmp_path)
    (base / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="001.png has no mask.*001_mask.png"):
        MVTecDataset(tmp_path, "bottle", "test", SMALL)
    with pytest.raises(DatasetError, match="'cable' not found.*bottle"):
        MVTecDataset(tmp_path, "cable", "train", SMALL)
    with pytest.raises(DatasetError, match="data folder not found"):
        MVTecDataset(tmp_path / "nowhere", "bottle", "train", SMALL)


def test_wrong_layout_names_the_expected_folder(tmp_path):
    write_image(tmp_path / "bottle" / "images" / "000.png")
    with pytest.raises(DatasetError, match="train"):
        MVTecDataset(tmp_path, "bottle", "train", SMALL)


def test_corrupt_and_truncated_images_are_named(tmp_path):
    base = write_mvtec(tmp_path)
    truncated = base / "train" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:50])
    (base / "train" / "good" / "002.png").write_bytes(b"this is no image")
    train = MVTecDataset(tmp_path, "bottle", "train", SMALL)
    for index, name in ((1, "001.png"), (2, "002.png")):
        with pytest.raises(DatasetError, match=name):
            train[index]


def test_k_shot_is_deterministic_per_seed(tmp_path):
    write_mvtec(tmp_path)
    picks = {seed: [s["image_path"] for s in MVTecDataset(tmp_path, "bottle", "train", SMALL, k_shot=2, seed=seed).samples]
             for seed in range(6)}
    again = [s["image_path"] for s in MVTecDataset(tmp_path, "bottle", "train", SMALL, k_shot=2, seed=0).samples]
    assert len(picks[0]) == 2 and picks[0] == again
    assert len({tuple(p) for p in picks.values()}) > 1
    with pytest.raises(DatasetError, match="k_shot=9"):
        MVTecDataset(tmp_path, "bottle", "train", SMALL, k_shot=9)


def test_visa_raw_release_from_split_csv(tmp_path):
    rows = ["object,split,label,image,mask"]
    for index in range(3):
        image = f"candle/Data/Images/Normal/{index:04d}.JPG"
        write_image(tmp_path / image)
        rows.append(f"candle,train,normal,{image},")
    write_image(tmp_path / "candle/Data/Images/Normal/0100.JPG")
    rows.append("candle,test,normal,candle/Data/Images/Normal/0100.JPG,")
    write_image(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    # raw VisA masks hold small label values, not 255
    write_mask(tmp_path / "candle/Data/Masks/Anomaly/000.png", value=1)
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png")
    write_image(tmp_path / "pcb1/Data/Images/Normal/0000.JPG")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert len(VisaDataset(tmp_path, "candle", "train", SMALL)) == 3
    test = VisaDataset(tmp_path, "candle", "test", SMALL)
    assert [s["label"] for s in test.samples] == [1, 0]
    assert test[0]["mask"].sum().item() == 64
    with pytest.raises(DatasetError, match="candle, pcb1"):
        VisaDataset(tmp_path, "pcb4", "train", SMALL)


def test_visa_converted_tree_with_same_stem_masks(tmp_path):
    base = tmp_path / "pcb1"
    for index in range(3):
        write_image(base / "train" / "good" / f"{index:03d}.JPG")
    write_image(base / "test" / "good" / "010.JPG")
    write_image(base / "test" / "bad" / "020.JPG")
    write_mask(base / "ground_truth" / "bad" / "020.png")
    test = VisaDataset(tmp_path, "pcb1", "test", SMALL)
    assert [(s["label"], s["defect_type"]) for s in test.samples] == [(1, "bad"), (0, "good")]
    assert test[0]["mask"].sum().item() == 64


def test_btad_bmp_images_and_masks(tmp_path):
    base = tmp_path / "01"
    for index in range(3):
        write_image(base / "train" / "ok" / f"{index:04d}.bmp")
    write_image(base / "test" / "ok" / "0100.bmp")
    write_image(base / "test" / "ko" / "0200.BMP")
    write_mask(base / "ground_truth" / "ko" / "0200.bmp")
    # YAML reads the category 01 as the integer 1
    train = BTADDataset(tmp_path, 1, "train", SMALL)
    test = BTADDataset(tmp_path, "01", "test", SMALL)
    assert len(train) == 3
    assert [(s["label"], s["defect_type"]) for s in test.samples] == [(1, "ko"), (0, "good")]
    assert test[0]["mask"].sum().item() == 64


def test_folder_dataset_holds_out_normals_and_matches_masks(tmp_path):
    for index in range(10):
        write_image(tmp_path / "ok" / f"{index}.png")
    for index in range(2):
        write_image(tmp_path / "defect" / f"d{index}.jpg")
        write_mask(tmp_path / "masks" / f"d{index}_mask.png")
    kwargs = dict(normal_dir="ok", abnormal_dir="defect", mask_dir="masks", normal_test_ratio=0.2, seed=1)
    train = FolderDataset(tmp_path, None, "train", SMALL, **kwargs)
    test = FolderDataset(tmp_path, None, "test", SMALL, **kwargs)
    train_paths = {s["image_path"] for s in train.samples}
    test_paths = {s["image_path"] for s in test.samples}
    assert len(train) == 8 and len(test) == 4
    assert not train_paths & test_paths
    assert sum(s["label"] for s in test.samples) == 2
    assert all(test[i]["mask"].sum() > 0 for i in range(len(test)) if test[i]["label"] == 1)
    no_masks = FolderDataset(tmp_path, None, "test", SMALL, normal_dir="ok", abnormal_dir="defect")
    assert no_masks.has_masks is False and train.has_masks is True


def test_folder_dataset_errors(tmp_path):
    write_image(tmp_path / "ok" / "0.png")
    write_image(tmp_path / "defect" / "d0.png")
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="d0.png has no mask"):
        FolderDataset(tmp_path, None, "test", SMALL, normal_dir="ok", abnormal_dir="defect", mask_dir="masks")
    with pytest.raises(DatasetError, match="normal_dir folder not found"):
        FolderDataset(tmp_path, None, "train", SMALL, normal_dir="missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no normal images"):
        FolderDataset(tmp_path, None, "train", SMALL, normal_dir="empty")


def test_transform_resizes_crops_and_normalises():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    mask = Image.fromarray(np.pad(np.full((10, 10), 7, np.uint8), ((5, 5), (15, 15))))
    tensor, mask_tensor = ImageTransform((20, 40), center_crop=(10, 20), normalize=True)(image, mask)
    assert tensor.shape == (3, 10, 20) and mask_tensor.shape == (1, 10, 20)
    assert torch.allclose(tensor[0], torch.full((10, 20), (1 - 0.485) / 0.229))
    assert torch.allclose(tensor[1], torch.full((10, 20), -0.456 / 0.224))
    assert mask_tensor.sum().item() == 10 * 10
    raw, _ = ImageTransform(8, normalize=False)(image)
    assert raw.max().item() == 1.0 and raw.shape == (3, 8, 8)


def test_dataloader_order_is_seeded(tmp_path):
    write_mvtec(tmp_path)
    train = MVTecDataset(tmp_path, "bottle", "train", SMALL)
    first = [path for batch in create_dataloader(train, 2, True, seed=4) for path in batch["image_path"]]
    second = [path for batch in create_dataloader(train, 2, True, seed=4) for path in batch["image_path"]]
    assert first == second and sorted(first) == sorted(s["image_path"] for s in train.samples)


def test_empty_training_set_and_bad_split_are_reported(tmp_path):
    base = write_mvtec(tmp_path)
    for path in (base / "train" / "good").iterdir():
        path.unlink()
    (base / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no train images found"):
        MVTecDataset(tmp_path, "bottle", "train", SMALL)
    with pytest.raises(DatasetError, match="split must be 'train' or 'test'"):
        MVTecDataset(tmp_path, "bottle", "val", SMALL)


def test_image_extensions_are_case_insensitive_and_k_shot_leaves_test_alone(tmp_path):
    base = write_mvtec(tmp_path)
    write_image(base / "train" / "good" / "100.JPG")
    write_image(base / "train" / "good" / "101.Tiff")
    assert len(MVTecDataset(tmp_path, "bottle", "train", SMALL)) == 7
    assert len(MVTecDataset(tmp_path, "bottle", "test", SMALL, k_shot=1)) == 5
    with pytest.raises(DatasetError, match="k_shot must be a positive int"):
        MVTecDataset(tmp_path, "bottle", "train", SMALL, k_shot=0)


def test_visa_wrong_layout_and_missing_raw_mask(tmp_path):
    write_image(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    with pytest.raises(DatasetError, match="split_csv/1cls.csv.*candle/train/good"):
        VisaDataset(tmp_path, "candle", "train", SMALL)
    (tmp_path / "split_csv").mkdir()
    write_image(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n")
    with pytest.raises(DatasetError, match="000.JPG has no mask; expected .*Masks/Anomaly/000.png"):
        VisaDataset(tmp_path, "candle", "test", SMALL)


def test_read_mask_binarises_palette_and_colour_masks(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putdata([0, 1, 2, 0])
    # index 1 is red, whose grey value rounds to zero without care
    palette.putpalette([0, 0, 0, 1, 0, 0, 0, 0, 9] + [0] * 759)
    palette.save(tmp_path / "p.png")
    Image.new("RGB", (2, 2), (0, 0, 3)).save(tmp_path / "rgb.png")
    assert np.asarray(read_mask(tmp_path / "p.png")).tolist() == [[0, 255], [255, 0]]
    assert np.asarray(read_mask(tmp_path / "rgb.png")).tolist() == [[255, 255], [255, 255]]
    with pytest.raises(DatasetError, match="mask not found: .*none.png"):
        read_mask(tmp_path / "none.png")


def test_masks_resize_with_nearest_neighbour():
    # a one pixel stripe at every other row: bilinear would give 0.5, nearest keeps whole rows
    mask = Image.fromarray(np.tile(np.array([[5], [0]], dtype=np.uint8), (8, 16)))
    _, resized = ImageTransform((8, 16), normalize=False)(Image.new("RGB", (16, 16)), mask)
    assert set(resized.unique().tolist()) <= {0.0, 1.0}
    assert resized.sum().item() == 8 * 16
    _, empty = ImageTransform((8, 16))(Image.new("RGB", (16, 16)), None)
    assert empty.shape == (1, 8, 16) and empty.sum().item() == 0
