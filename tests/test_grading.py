# tests/test_grading.py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import cohen_kappa_score

from defectvad.errors import ConfigError
from defectvad.grading.calibration import MapCalibration
from defectvad.grading.contrast import ring_around, ring_contrast
from defectvad.grading.defect_types import TypeClassifier, confusion_matrix
from defectvad.grading.kappa import quadratic_weighted_kappa
from defectvad.grading.localisation import box_iou, measure_hits
from defectvad.grading.regions import find_regions, mask_regions
from defectvad.grading.severity import assign_levels, check_cut_points, default_cut_points, fit_cut_points, \
    initial_cut_points
from defectvad.visualization.colour_range import choose_map_range


def test_regions_boxes_areas_and_scores_on_a_hand_made_map():
    calibrated = np.zeros((10, 12))
    calibrated[1:3, 2:5] = 2.0  # 6 pixels
    calibrated[2, 3] = 5.0
    calibrated[6, 8] = 3.0  # a diagonal pair: one 8-connected region of 2
    calibrated[7, 9] = 4.0
    calibrated[9, 0] = 9.0  # one pixel, under min_area
    regions = find_regions(calibrated, 1.5, min_area=2)
    assert len(regions) == 2
    first, second = regions  # by peak, highest first
    assert first["bbox"] == [2, 1, 4, 2] and first["area_px"] == 6
    assert first["area_pct"] == pytest.approx(100 * 6 / 120)
    assert first["centroid"] == pytest.approx([3.0, 1.5])
    assert first["peak_score"] == 5.0 and first["mean_score"] == pytest.approx((5 * 2 + 5) / 6)
    assert second["bbox"] == [8, 6, 9, 7] and second["area_px"] == 2 and second["centroid"] == [8.5, 6.5]
    assert second["mask"].sum() == 2 and second["mask"][7, 9]
    assert len(find_regions(calibrated, 1.5, min_area=1)) == 3
    truths = mask_regions(calibrated > 1.5)
    assert sorted(r["bbox"] for r in truths) == [[0, 9, 0, 9], [2, 1, 4, 2], [8, 6, 9, 7]]


def test_ring_contrast_is_the_weber_contrast_of_the_most_changed_channel():
    image = np.full((20, 20, 3), 0.5)
    mask = np.zeros((20, 20), dtype=bool)
    mask[8:12, 8:12] = True
    image[mask, 1] = 0.4  # green 20 % darker
    image[mask, 0] = 0.55  # red 10 % brighter
    assert ring_contrast(image, mask, width=2) == pytest.approx(-20.0)
    image[0:3, :, 1] = 0.9  # far away: outside the ring, no effect
    assert ring_contrast(image, mask, width=2) == pytest.approx(-20.0)


def test_region_colour_difference_matches_skimage_and_semu_follows_semi_d31():
    from skimage.color import deltaE_ciede2000, rgb2lab

    from defectvad.grading.images import describe_regions, grade_regions, map_pixel_area_mm2

    image = np.full((30, 30, 3), 0.5)
    image[:, :, 2] = 0.4
    mask = np.zeros((30, 30), dtype=bool)
    mask[10:16, 12:18] = True
    image[mask, 0] = 0.55  # red 10 % brighter
    image[mask, 1] = 0.47  # green 6 % darker
    region, = describe_regions(mask * 5.0, image, 1.0, 1, 3, 0.0, pixel_area_mm2=0.08)
    ring = ring_around(mask, 3)
    expected = deltaE_ciede2000(rgb2lab(image[mask].mean(0)[None, None]), rgb2lab(image[ring].mean(0)[None, None]))
    # skimage's sRGB matrix has 6 decimals, ours 7: 1e-5 apart
    assert region["delta_e2000"] == pytest.approx(float(expected[0, 0]), rel=1e-4) and region["delta_e2000"] > 3
    assert region["contrast_pct"] == pytest.approx(10.0)
    # SEMU: contrast over the just noticeable contrast of the area, 36 pixels of 0.08 mm2
    assert region["semu"] == pytest.approx(10.0 / (1.97 / (36 * 0.08) ** 0.33 + 0.72))
    level, _ = grade_regions([region], None, "semu", default_cut_points(None, key="semu"))
    assert level == 4 and 4 <= region["semu"] < 8
    # a 1024 x 512 file resized to 256 x 256: one map pixel is 4 x 2 file pixels; with a 224 crop seen at 112, 8 x 4
    resized = OmegaConf.create({"image_size": [256, 256], "center_crop": None})
    assert map_pixel_area_mm2((1024, 512), resized, (256, 256), 0.1) == pytest.approx(8 * 0.01)
    cropped = OmegaConf.create({"image_size": [256, 256], "center_crop": [224, 224]})
    assert map_pixel_area_mm2((1024, 512), cropped, (112, 112), 0.1) == pytest.approx(32 * 0.01)


def test_quadratic_weighted_kappa_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(1, 6, 40)
        predicted = np.clip(truth + rng.integers(-2, 3, 40), 0, 5)
        expected = cohen_kappa_score(truth, predicted, weights="quadratic", labels=list(range(6)))
        assert quadratic_weighted_kappa(truth, predicted, range(6)) == pytest.approx(expected, abs=1e-12)
        expected = cohen_kappa_score(truth, predicted, weights="quadratic")
        assert quadratic_weighted_kappa(truth, predicted) == pytest.approx(expected, abs=1e-12)
    assert quadratic_weighted_kappa([1, 2, 3], [1, 2, 3]) == 1.0
    # quadratic: a miss by two costs four times a miss by one
    one = quadratic_weighted_kappa([1, 2, 3, 4, 5], [2, 2, 3, 4, 5], range(1, 6))
    two = quadratic_weighted_kappa([1, 2, 3, 4, 5], [3, 2, 3, 4, 5], range(1, 6))
    assert two < one < 1


def test_levels_from_cut_points_and_fitting_improves_kappa():
    assert assign_levels([0.5, 1.0, 2.5, 9.0, np.nan], [1, 2, 3, 4]).tolist() == [1, 2, 3, 5, 0]
    # true level rises with the score, but unevenly: the quantile start misplaces levels, the fit puts them right
    rng = np.random.default_rng(1)
    truth = np.repeat([1, 2, 3, 4, 5], 8)
    scores = np.array([[0.1, 0.2, 0.25, 0.3, 5.0][level - 1] for level in truth]) + rng.uniform(0, 0.04, truth.size)
    scores[:3] += 4.9  # three level-1 images score like level 5 (the start spreads levels by shares, off here)
    start = initial_cut_points(scores, truth)
    start_kappa = quadratic_weighted_kappa(truth, assign_levels(scores, start), range(6))
    cuts, kappa = fit_cut_points(scores, truth)
    assert kappa == pytest.approx(quadratic_weighted_kappa(truth, assign_levels(scores, cuts), range(6)))
    assert kappa > start_kappa + 0.05
    assert np.all(np.diff(cuts) > 0)
    # the clean levels 2-4 all land right
    assert (assign_levels(scores[8:32], cuts) == truth[8:32]).all()
    with pytest.raises(ConfigError, match="increasing"):
        check_cut_points([1, 3, 2, 4])


def test_default_cut_points_sit_at_the_stated_normal_quantiles():
    rng = np.random.default_rng(2)
    normal = rng.exponential(2.0, 200_000) + 1.0
    calibration = MapCalibration().fit(normal, 0.999)
    assert calibration(np.quantile(normal, 0.5)) == pytest.approx(0.0, abs=1e-9)
    assert calibration(np.quantile(normal, 0.999)) == pytest.approx(1.0)
    assert calibration.raw_quantile(0.9) == pytest.approx(np.quantile(normal, 0.9), rel=1e-3)
    # beyond the data: the exponential tail (true scale 2) -> 1 + 2 ln(1 / (1 - q))
    quantiles = (0.9999, 0.999999, 1 - 1e-8, 1 - 1e-10)
    cuts = default_cut_points(calibration, quantiles)
    raw = cuts * calibration.scale + calibration.shift
    assert raw == pytest.approx([1 + 2 * np.log(1 / (1 - q)) for q in quantiles], rel=0.03)
    assert np.all(np.diff(cuts) > 0)
    restored = MapCalibration.from_dict(calibration.describe())
    assert restored(5.0) == calibration(5.0) and restored.raw_quantile(0.9999) == calibration.raw_quantile(0.9999)


@pytest.mark.parametrize("kind", ["nearest_centroid", "logistic"])
def test_type_classifier_on_separable_features(kind):
    rng = np.random.default_rng(3)
    centres = {"mura": [5, 0, 0], "line": [0, 5, 0], "scratch": [0, 0, 5]}
    labels = [name for name in centres for _ in range(10)]
    features = np.array([centres[name] for name in labels]) + rng.normal(0, 0.5, (30, 3))
    classifier = TypeClassifier(kind).fit(features, labels)
    tests = np.array([centres[name] for name in centres]) + rng.normal(0, 0.5, (3, 3))
    assert classifier.predict(tests) == list(centres)
    assert TypeClassifier.from_dict(classifier.describe()).predict(tests) == list(centres)
    if kind == "nearest_centroid":
        # the linear rule is the nearest standardised centroid
        x = (tests - features.mean(0)) / (features.std(0) + 1e-6)
        centroids = np.stack([((features - features.mean(0)) / (features.std(0) + 1e-6))[np.array(labels) == c]
                              .mean(0) for c in classifier.classes])
        nearest = [classifier.classes[i] for i in ((x[:, None] - centroids[None]) ** 2).sum(2).argmin(1)]
        assert nearest == list(centres)
    matrix = confusion_matrix(["mura", "line", "line"], ["mura", "none", "mura"], ["line", "mura"])
    assert matrix["columns"] == ["line", "mura", "none"] and matrix["matrix"] == [[0, 1, 1], [0, 1, 0]]


def test_localisation_hits_at_box_iou():
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:10, 0:10] = True
    shifted = np.zeros((20, 20), dtype=bool)
    shifted[0:10, 5:15] = True
    truths = [[{"bbox": [0, 0, 9, 9], "mask": mask}], [{"bbox": [0, 0, 9, 9], "mask": mask}]]
    predicted = [[{"bbox": [5, 0, 14, 9], "mask": shifted}], [{"bbox": [7, 0, 16, 9], "mask": shifted}]]
    hits = measure_hits(truths, predicted, 0.3)
    assert hits["true_regions"] == 2 and hits["hits"] == 1 and hits["hit_rate"] == 0.5


def test_colour_range_from_normal_quantiles_ignores_one_outlier():
    rng = np.random.default_rng(4)
    normal = torch.tensor(rng.uniform(0, 10, (4, 1, 50, 50)))
    test = torch.cat([normal, torch.full((1, 1, 50, 50), 20.0)])
    test[-1, 0, 0, 0] = 300.0  # one image scores 300 where the rest stay below 100
    (low, high), _ = choose_map_range(test, normal)
    expected_low, top = np.quantile(normal.numpy(), [0.01, 0.999])
    assert low == pytest.approx(expected_low) and high == pytest.approx(expected_low + 2 * (top - expected_low))
    assert high < 21
    (low_without, high_without), _ = choose_map_range(test[:-1], normal)
    assert (low_without, high_without) == (low, high)


def write_panel_images(folder, count_per_level=2):
    # grey 32x32 images: normals, and per type (a bright square "blob", a dark row "line") one defect per level
    # whose map rises with the level; returns (paths, labels, types, levels, masks, maps)
    from PIL import Image

    rng = np.random.default_rng(5)
    paths, labels, types, levels, masks, maps = [], [], [], [], [], []
    for index in range(6):
        paths.append(folder / f"good_{index}.png")
        labels.append(0), types.append(None), levels.append(0), masks.append(np.zeros((32, 32), dtype=bool))
    for name in ("blob", "line"):
        for level in range(1, 6):
            for copy in range(count_per_level):
                mask = np.zeros((32, 32), dtype=bool)
                y, x = 4 + 5 * copy, 3 + 4 * level
                if name == "blob":
                    mask[y:y + 5, x:x + 5] = True
                else:
                    mask[y + 10, 2:30] = True
                paths.append(folder / f"{name}_{level}_{copy}.png")
                labels.append(1), types.append(name), levels.append(level), masks.append(mask)
    for path, mask, level, name in zip(paths, masks, levels, types):
        image = np.full((32, 32, 3), 128.0) + rng.normal(0, 1, (32, 32, 3))
        image[mask] += (8 * level) if name == "blob" else -(8 * level)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        maps.append(rng.uniform(0, 1, (32, 32)) + mask * (1.0 + level))
    return paths, labels, types, levels, masks, maps


def test_grade_run_writes_levels_types_and_regions(tmp_path):
    import json
    from types import SimpleNamespace

    from defectvad.grading.run_grading import grade_run
    from defectvad.grading.run_model import RunGrading

    paths, labels, types, levels, masks, maps = write_panel_images(tmp_path)
    samples = [{"image_path": str(p), "label": label, "defect_type": t or "good"}
               for p, label, t in zip(paths, labels, types)]
    test_set = SimpleNamespace(samples=samples, defects={str(p): {"level": lv} for p, lv in zip(paths, levels) if lv})
    holdout_maps = torch.tensor(np.random.default_rng(6).uniform(0, 1, (8, 1, 32, 32)))
    predictions = {"anomaly_map": torch.tensor(np.stack(maps))[:, None], "label": torch.tensor(labels),
                   "image_path": [str(p) for p in paths], "mask": torch.tensor(np.stack(masks))[:, None],
                   "has_masks": True, "holdout": {"anomaly_map": holdout_maps, "pred_score": torch.zeros(8)}}
    thresholds = {"f1_test": {"image": 1.0, "pixel": 1.5}, "normal": {"image": 1.0, "pixel": 1.5}}
    grading = OmegaConf.load("conf/config.yaml").grading
    grading.min_area = 3
    grading.folds = 2
    grading.shape_features = True
    cfg = OmegaConf.create({"seed": 0, "backbone": {"name": "resnet18", "pretrained": False},
                            "dataset": {"max_image_pixels": None}, "grading": grading,
                            "transform": {"image_size": [32, 32], "center_crop": None, "normalize": None,
                                          "mean": None, "std": None, "interpolation": None}})
    torch.manual_seed(0)
    summary = grade_run(cfg, tmp_path, {"test_set": test_set}, predictions, thresholds, None, "cpu")
    # every map holds its defect exactly: each true region is hit, no normal image has a region
    assert summary["localisation"]["hit_rate"] == 1.0 and summary["normal_images_with_regions"] == 0
    assert summary["qwk"]["fitted_in_sample"] == 1.0 and summary["qwk"]["fitted"] > 0.8
    # random backbone weights: most, not all, cross-fitted types right; the matrix agrees with the accuracy
    matrix = np.array(summary["types"]["confusion_matrix"]["matrix"])
    assert summary["types"]["confusion_matrix"]["columns"] == ["blob", "line", "none"]
    assert matrix.sum(1).tolist() == [10, 10] and matrix[:, 2].sum() == 0
    assert summary["types"]["accuracy"] == np.trace(matrix) / 20 >= 0.75
    rows = (tmp_path / "regions.csv").read_text().splitlines()
    assert len(rows) == 1 + 20
    stored = json.loads((tmp_path / "grading.json").read_text())
    blob = next(image for image in stored["images"] if image["image_path"].endswith("blob_5_0.png"))
    assert blob["regions"][0]["bbox"] == [23, 4, 27, 8] and blob["regions"][0]["area_px"] == 25
    assert blob["regions"][0]["contrast_pct"] > 20 and blob["level"] == 5 and blob["type"] == "blob"
    # tools/predict.py's grading of a new picture with the run's fitted cut-points and classifier, whose backbone
    # layers the run saved (random weights here: the same features only if they are restored)
    assert (tmp_path / "weights" / "grading_features.safetensors").is_file()
    torch.manual_seed(1)
    from defectvad.data.images import read_image
    from defectvad.data.transforms import create_transform

    transform = create_transform(cfg.transform, "resnet18", False)
    run = SimpleNamespace(run_dir=tmp_path, transform=transform, cfg=cfg, device=torch.device("cpu"))
    picture, _ = transform(read_image(paths[-1]))
    level, defect_type, regions = RunGrading(run)(picture, torch.tensor(maps[-1]), (64, 32))
    assert (level, defect_type, len(regions)) == (5, "line", 1) and regions[0]["bbox"] == [2, 19, 29, 19]
    # a file twice as wide as the map: each map pixel covers 2 x 0.1 x 0.1 mm2
    area_mm2 = regions[0]["area_px"] * 2 * 0.01
    assert regions[0]["semu"] == pytest.approx(abs(regions[0]["contrast_pct"]) / (1.97 / area_mm2 ** 0.33 + 0.72))


def test_extent_trims_a_region_to_half_its_peak():
    calibrated = np.zeros((9, 9))
    calibrated[2:7, 2:7] = 2.0
    calibrated[4, 4] = 10.0
    calibrated[4, 5] = 6.0
    whole, = find_regions(calibrated, 1.0, min_area=3)
    trimmed, = find_regions(calibrated, 1.0, min_area=3, extent=0.5)
    assert whole["area_px"] == 25 and whole["bbox"] == [2, 2, 6, 6]
    assert trimmed["area_px"] == 2 and trimmed["bbox"] == [4, 4, 5, 4] and trimmed["mean_score"] == 8.0
