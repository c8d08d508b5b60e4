# tests/test_panel.py
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from scipy import ndimage

from defectvad.data.categories import build_dataset, resolve_categories
from defectvad.data.panel import PanelDataset
from defectvad.data.panel_generator import DEFECT_TYPES, GENERATOR_VERSION, STAMP, read_defects, render_sample
from defectvad.data.panel_severity import jnd_contrast, severity_index, severity_level
from defectvad.data.transforms import ImageTransform
from defectvad.errors import DatasetError
from defectvad.sweeps.callbacks import prepare_sweeps

ROOT = Path(__file__).resolve().parents[1]

SMALL = ImageTransform(32, normalize=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("panel")
    # the data set writes its category on first use
    test = PanelDataset(root, "plain", "test", SMALL)
    return root, test


@pytest.fixture(scope="module")
def rendered():
    return {(t, i): render_sample("plain", "test", t, i) for t in DEFECT_TYPES for i in range(5)}


def read_array(path):
    with Image.open(path) as image:
        return np.asarray(image)


def relative_change(sample):
    return (np.abs(sample["defective"] - sample["clean"]) / sample["clean"]).max(axis=2)


def test_first_use_writes_the_mvtec_layout_and_one_defect_per_type_and_level(generated):
    root, test = generated
    train = PanelDataset(root, "plain", "train", SMALL)
    assert len(train) == 40 and len(test) == 40
    assert sorted({s["defect_type"] for s in test.samples}) == sorted(DEFECT_TYPES + ("good",))
    rows = read_defects(root / "plain")
    assert sorted((r["type"], r["level"]) for r in rows) == sorted((t, l) for t in DEFECT_TYPES for l in range(1, 6))
    assert set(test.defects) == {s["image_path"] for s in test.samples if s["label"] == 1}
    assert json.loads((root / "plain" / STAMP).read_text())["version"] == GENERATOR_VERSION
    assert read_array(root / "plain" / "train" / "good" / "000.png").shape == (256, 256, 3)
    assert not list(root.glob(".*tmp*"))


def test_generation_is_deterministic_for_a_seed_and_differs_for_another(rendered):
    # the files hold exactly what render_sample gives (next test), so equal renders give equal trees
    for key in (("mura", 0), ("scratch", 3), ("stuck_pixel", 4)):
        again = render_sample("plain", "test", *key)
        for name in ("image", "clean", "defective", "mask"):
            assert np.array_equal(again[name], rendered[key][name])
        assert again["record"] == rendered[key]["record"]
    other = render_sample("plain", "test", "mura", 2, seed=1)
    assert not np.array_equal(other["image"], rendered[("mura", 2)]["image"])
    assert not np.array_equal(render_sample("plain", "train", "good", 1)["image"],
                              render_sample("plain", "train", "good", 2)["image"])


def test_files_hold_the_rendered_image_and_mask(generated, rendered):
    root, _ = generated
    for (defect_type, index), sample in rendered.items():
        assert np.array_equal(read_array(root / "plain" / "test" / defect_type / f"{index:03d}.png"), sample["image"])
        mask = read_array(root / "plain" / "ground_truth" / defect_type / f"{index:03d}_mask.png")
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert np.array_equal(mask > 0, sample["mask"])


def test_masks_cover_where_the_image_differs_from_the_clean_panel(rendered):
    for (defect_type, index), sample in rendered.items():
        change, mask = relative_change(sample), sample["mask"]
        peak = change.max()
        assert peak > 0
        # the defect's core lies inside the mask, the mask inside its half-peak region
        assert not (change >= 0.7 * peak)[~mask].any(), (defect_type, index)
        assert (change[mask] >= 0.5 * peak).all(), (defect_type, index)
        far = ndimage.distance_transform_edt(~mask) > 30
        assert change[far].max(initial=0) < 0.08 * peak, (defect_type, index)


def test_csv_rows_match_the_masks_and_the_contrast(generated, rendered):
    root, _ = generated
    rows = read_defects(root / "plain")
    assert len(rows) == 30
    for row in rows:
        mask = read_array(root / "plain" / row["mask"]) > 0
        ys, xs = np.nonzero(mask)
        assert row["area_px"] == mask.sum()
        assert (row["bbox_x_min"], row["bbox_y_min"], row["bbox_x_max"], row["bbox_y_max"]) == (
            xs.min(), ys.min(), xs.max(), ys.max())
        assert row["centroid_x"] == pytest.approx(xs.mean(), abs=1e-4)
        assert row["centroid_y"] == pytest.approx(ys.mean(), abs=1e-4)
        sample = rendered[(row["type"], int(row["image"][-7:-4]))]
        contrast = 100 * relative_change(sample)[mask].mean()
        assert row["contrast_pct"] == pytest.approx(contrast, abs=1e-4)
        jnd = 1.97 / (row["area_px"] * 0.01) ** 0.33 + 0.72
        assert row["severity_index"] == pytest.approx(contrast / jnd, abs=1e-4)
        assert row["level"] == 1 + sum(contrast / jnd >= cut for cut in (1, 2, 4, 8))


def test_severity_rule_on_hand_made_cases():
    # 100 pixels are 1 mm2 at 0.1 mm per pixel: the just noticeable contrast is 1.97 + 0.72 = 2.69 %
    assert jnd_contrast(100) == pytest.approx(2.69)
    assert jnd_contrast(4) == pytest.approx(1.97 / 0.04 ** 0.33 + 0.72) and 6.41 < jnd_contrast(4) < 6.43
    cases = [(2.6, 100, 1), (2.8, 100, 2), (5.3, 100, 2), (5.5, 100, 3), (10.7, 100, 3), (10.8, 100, 4),
             (21.4, 100, 4), (21.6, 100, 5), (1.0, 900, 1), (2.0, 900, 2), (6.0, 4, 1), (60.0, 4, 5), (-2.8, 100, 2)]
    for contrast, area, level in cases:
        assert severity_level(contrast, area) == level, (contrast, area)
    assert severity_index(5.38, 100) == pytest.approx(2.0)
    levels = severity_level(np.array([2.6, 2.8, 21.6]), np.array([100, 100, 100]))
    assert levels.tolist() == [1, 2, 5]


def test_level_one_is_below_the_just_noticeable_contrast_and_near_the_noise(generated):
    root, _ = generated
    rows = read_defects(root / "plain")
    normal = render_sample("plain", "train", "good", 0)
    noise = np.std(normal["image"] / 255.0 - normal["clean"]) / normal["clean"].mean()
    assert 0.012 < noise < 0.022
    first = [r for r in rows if r["level"] == 1]
    assert len(first) == len(DEFECT_TYPES)
    for row in first:
        assert row["contrast_pct"] < 1.97 / (row["area_px"] * 0.01) ** 0.33 + 0.72
        assert row["contrast_pct"] < 6.5
        if row["type"] in ("mura", "line"):
            # per pixel, no stronger than the sensor noise
            assert row["contrast_pct"] < 2.3 and row["contrast_pct"] / 100 < 1.5 * noise
    assert all(r["severity_index"] >= 8 for r in rows if r["level"] == 5)


def test_a_tree_of_another_version_or_without_a_stamp_is_refused(generated, tmp_path):
    root, _ = generated
    (tmp_path / "stripe").mkdir()
    stamp = tmp_path / "stripe" / STAMP
    stamp.write_text(json.dumps({"version": GENERATOR_VERSION - 1, "seed": 0}))
    with pytest.raises(DatasetError, match=f"version {GENERATOR_VERSION - 1} with seed 0; this is version "
                                           f"{GENERATOR_VERSION}.*rm -r"):
        PanelDataset(tmp_path, "stripe", "train", SMALL)
    stamp.unlink()
    with pytest.raises(DatasetError, match="not written by the panel generator"):
        PanelDataset(tmp_path, "stripe", "train", SMALL)
    with pytest.raises(DatasetError, match="seed 0; this is version .* with seed 3"):
        PanelDataset(root, "plain", "train", SMALL, generator_seed=3)
    with pytest.raises(DatasetError, match="unknown panel category 'lcd'; choose from plain, stripe"):
        PanelDataset(tmp_path, "lcd", "train", SMALL)
    assert sorted(p.name for p in (tmp_path / "stripe").iterdir()) == []


def test_dataset_panel_composes_and_builds(generated):
    root, _ = generated
    prepare_sweeps()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=panel", f"dataset.root={root}"])
        every = compose("config", overrides=["dataset=panel", "dataset.category=all"])
    assert (cfg.dataset.category, cfg.dataset.generator_seed) == ("plain", 0)
    train = build_dataset(cfg.dataset, split="train", transform=SMALL, seed=0)
    assert isinstance(train, PanelDataset) and len(train) == 40
    assert resolve_categories(every.dataset) == ["plain", "stripe"]


def test_the_panel_sheet_tool_names_an_unknown_category_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("panel_sheet", ROOT / "tools" / "panel_sheet.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--root", str(tmp_path), "--category", "nope", "--out", str(tmp_path / "sheet.png")]) == 1
    assert capsys.readouterr().err == "error: unknown panel categories: nope; choose from plain, stripe\n"
    assert not (tmp_path / "sheet.png").exists()
