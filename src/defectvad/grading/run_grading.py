# src/defectvad/grading/run_grading.py
# severity, type and location of every test image of a run: the maps calibrated on normal images, regions and
# their contrast, levels from given, fitted or default cut-points, types from a classifier fitted on the labelled
# defect images (their true masks' pooled features). Fitted cut-points and types are judged cross-fitted: each
# labelled image graded by cut-points and a classifier fitted on the other folds; grading.json keeps those fitted
# on all of them for tools/predict.py
import csv
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from defectvad.atomic_files import write_text_atomic
from defectvad.errors import ConfigError
from defectvad.grading.calibration import MapCalibration
from defectvad.grading.contrast import ring_contrast
from defectvad.grading.defect_types import NO_REGION, TypeClassifier, confusion_matrix
from defectvad.grading.images import SEVERITY_SCORES, describe_regions, grade_regions, map_pixel_area_mm2, \
    public_region, worst_score
from defectvad.grading.kappa import quadratic_weighted_kappa
from defectvad.grading.localisation import measure_hits
from defectvad.grading.region_shape import describe_shape
from defectvad.grading.regions import mask_regions
from defectvad.grading.severity import IMAGE_LEVELS, assign_levels, check_cut_points, default_cut_points, \
    fit_cut_points

log = logging.getLogger("defectvad")
FEATURE_WEIGHTS = "weights/grading_features.safetensors"
REGION_COLUMNS = ("image_path", "region", "x_min", "y_min", "x_max", "y_max", "centroid_x", "centroid_y", "area_px",
                  "area_pct", "peak_score", "mean_score", "contrast_pct", "delta_e2000", "semu", "severity_score",
                  "level", "type", "image_level", "image_type", "true_level", "true_type")


def check_grading(settings):
    if settings.severity_score not in SEVERITY_SCORES:
        raise ConfigError(f"grading.severity_score must be one of: {', '.join(SEVERITY_SCORES)}; "
                          f"got '{settings.severity_score}'")
    if not settings.pixel_mm > 0:
        raise ConfigError(f"grading.pixel_mm must be a positive pixel pitch in mm, got {settings.pixel_mm}")
    if settings.folds < 2:
        raise ConfigError(f"grading.folds must be 2 or more, got {settings.folds}")
    if settings.cut_points is not None:
        check_cut_points(settings.cut_points)


def true_type(sample, dataset):
    # the user's abnormal_dir/<type>/ images: the folder below abnormal_dir names the type
    abnormal_dir = getattr(dataset, "abnormal_dir", None)
    if abnormal_dir is not None and sample["label"] == 1:
        try:
            parts = Path(sample["image_path"]).resolve().relative_to(Path(dataset.resolve(abnormal_dir, "abnormal_dir"))
                                                                     .resolve()).parts
            if len(parts) > 1:
                return parts[0]
        except (ValueError, AttributeError):
            pass
    return sample["defect_type"] if sample["label"] == 1 else None


def read_truth(dataset, paths):
    samples = {sample["image_path"]: sample for sample in dataset.samples}
    defects = getattr(dataset, "defects", {}) or {}
    levels, types = [], []
    for path in paths:
        sample = samples[path]
        levels.append(int(defects[path]["level"]) if path in defects else (0 if sample["label"] == 0 else None))
        types.append(true_type(sample, dataset))
    return levels, types


def assign_folds(types, labelled, folds, seed):
    # labelled images split into folds with each type spread over them (-1: not labelled)
    rng = np.random.default_rng(seed)
    fold = np.full(len(types), -1)
    groups = {}
    for index in np.flatnonzero(labelled):
        groups.setdefault(types[index], []).append(index)
    offset = 0
    for name in sorted(groups):
        members = rng.permutation(groups[name])
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return fold


def load_pictures(cfg, paths, size):
    # (display pictures (H, W, 3) and normalised inputs for the features, both at the kept maps' size: the input size,
    # or a tiled run's tile size, so that memory follows the kept maps, not the full-size images; the files' own
    # (width, height))
    from torchvision.transforms import functional as F
    from torchvision.transforms.v2 import functional as TF

    from defectvad.data.images import read_image
    from defectvad.data.transforms import create_transform

    transform = create_transform(cfg.transform, cfg.backbone.name, False)
    max_pixels = cfg.dataset.get("max_image_pixels")
    pictures, inputs, sizes = [], [], []
    for path in paths:
        image = read_image(path, max_pixels)
        sizes.append((image.shape[-1], image.shape[-2]))
        picture, _ = transform(image)
        if tuple(picture.shape[-2:]) != tuple(size):
            picture = TF.resize(picture, list(size), antialias=True)
        inputs.append(F.normalize(picture, transform.mean, transform.std))
        pictures.append(picture.permute(1, 2, 0).double().numpy())
    return pictures, inputs, sizes


def normal_maps(predictions):
    holdout = predictions.get("holdout")
    if holdout is not None:
        return holdout["anomaly_map"][:, 0].double().numpy(), f"{len(holdout['pred_score'])} held-out normal images"
    normal = (predictions["label"] == 0).numpy()
    if not normal.any():
        raise ConfigError("grading needs normal images to calibrate the maps: set evaluation.holdout (e.g. 10)")
    return (predictions["anomaly_map"][normal, 0].double().numpy(),
            f"the {int(normal.sum())} normal test images (no held-out normals: evaluation.holdout=10 keeps some)")


def grade_run(cfg, run_dir, data, predictions, thresholds, weights_path, device):
    from defectvad.grading.region_features import RegionFeatures
    from defectvad.metrics.thresholds import select_threshold

    started = time.perf_counter()
    settings = cfg.grading
    check_grading(settings)
    run_dir = Path(run_dir)
    maps = predictions["anomaly_map"][:, 0].double().numpy()
    paths = list(predictions["image_path"])
    normal, normal_source = normal_maps(predictions)
    calibration = MapCalibration().fit(normal, settings.calibration_quantile)
    _, raw_threshold, threshold_kind = select_threshold(thresholds, settings.threshold)
    threshold = float(calibration(raw_threshold))
    pictures, inputs, sizes = load_pictures(cfg, paths, maps.shape[-2:])
    extractor = RegionFeatures(cfg.backbone.name, settings.feature_layers, weights_path, device)
    regions = [describe_regions(calibration(m), p, threshold, settings.min_area, settings.ring_width, settings.extent,
                                map_pixel_area_mm2(size, cfg.transform, maps.shape[-2:], settings.pixel_mm))
               for m, p, size in zip(maps, pictures, sizes)]
    features = [extractor(x, [r["mask"] for r in found]) for x, found in zip(inputs, regions)]
    masks = predictions["mask"][:, 0].numpy() > 0 if predictions["has_masks"] else None
    levels, types = read_truth(data["test_set"], paths)
    key = settings.severity_score
    scores = np.array([worst_score(found, key) for found in regions])

    # labelled examples: levels (cut-points), types with their true masks (classifier)
    has_level = np.array([level is not None and level > 0 for level in levels])
    has_type = np.array([t is not None and masks is not None and masks[i].any() for i, t in enumerate(types)])
    labelled = has_level | has_type
    if settings.shape_features:
        features = [np.concatenate([f, np.stack([describe_shape(r) for r in found])], 1) if found else f
                    for f, found in zip(features, regions)]
    true_features = {i: example_features(extractor, inputs[i], pictures[i], masks[i], regions[i], features[i],
                                         settings) for i in np.flatnonzero(has_type)}
    defaults = default_cut_points(calibration, tuple(settings.default_quantiles), key)
    fold = assign_folds(types, labelled, settings.folds, cfg.seed)
    fits = {}
    for k in list(range(settings.folds)) + ["all"]:
        train = (fold != k) & labelled if k != "all" else labelled
        fits[k] = fit_models(scores, levels, types, true_features, train & has_level, train & has_type, settings,
                             cfg.seed)
    given = None if settings.cut_points is None else check_cut_points(settings.cut_points)
    applied = "given" if given is not None else ("fitted" if fits["all"]["cut_points"] is not None else "default")

    # each image graded by the cut-points in use: labelled ones by their fold's fit, the rest by the fit on all
    image_levels, image_types, default_levels = [], [], []
    for i, found in enumerate(regions):
        fit = fits[int(fold[i])] if fold[i] >= 0 else fits["all"]
        cuts = {"given": given, "fitted": fit["cut_points"], "default": defaults}[applied]
        level, defect_type = grade_regions(found, features[i], key, cuts, fit["classifier"])
        image_levels.append(level)
        image_types.append(defect_type)
        default_levels.append(int(assign_levels([scores[i]], defaults)[0]))
    summary = summarize_grading(settings, extractor.layers, levels, types, image_levels, image_types, default_levels,
                                scores, fits, fold, has_level, has_type, masks, regions, applied, given)
    summary.update({"calibration": f"percentile rule on the maps of {normal_source}: (m - median) / "
                                   f"(q{settings.calibration_quantile} - median) of their pixels",
                    "region_threshold": {"kind": threshold_kind, "raw": raw_threshold, "calibrated": threshold},
                    "default_quantiles": list(settings.default_quantiles),
                    "cut_points": {"given": None if given is None else given.tolist(), "default": defaults.tolist(),
                                   "fitted": as_list(fits["all"]["cut_points"])},
                    "grading_s": round(time.perf_counter() - started, 3)})
    if fits["all"]["classifier"] is not None:
        # the type classifier's features without the backbone file, as the run's weights predict without it
        from defectvad.engine.checkpoints import save_weights

        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        save_weights(extractor.extractor, run_dir / FEATURE_WEIGHTS)
    write_grading(run_dir, settings, calibration, raw_threshold, threshold, threshold_kind, summary, fits["all"],
                  paths, regions, image_levels, image_types, levels, types)
    return summary


def example_features(extractor, image, picture, mask, found, features, settings):
    # a labelled defect's features: those of the predicted region that covers most of its true mask (what the
    # classifier will see), else of the true mask itself
    overlaps = [int((region["mask"] & mask).sum()) for region in found]
    if overlaps and max(overlaps) > 0:
        return features[int(np.argmax(overlaps))]
    pooled = extractor(image, [mask])[0]
    if not settings.shape_features:
        return pooled
    ys, xs = np.nonzero(mask)
    region = {"bbox": [xs.min(), ys.min(), xs.max(), ys.max()], "area_px": int(mask.sum()),
              "contrast_pct": ring_contrast(picture, mask, settings.ring_width)}
    return np.concatenate([pooled, describe_shape(region)])


def as_list(values):
    return None if values is None else [float(v) for v in values]


def fit_models(scores, levels, types, true_features, level_rows, type_rows, settings, seed):
    fit = {"cut_points": None, "classifier": None}
    rows = np.flatnonzero(level_rows)
    if settings.fit_cut_points and len({levels[i] for i in rows}) >= 2:
        fit["cut_points"], _ = fit_cut_points(scores[rows], [levels[i] for i in rows])
    rows = np.flatnonzero(type_rows)
    if len({types[i] for i in rows}) >= 2:
        fit["classifier"] = TypeClassifier(settings.type_classifier, seed).fit(
            np.stack([true_features[i] for i in rows]), [types[i] for i in rows])
    return fit


def summarize_grading(settings, layers, levels, types, image_levels, image_types, default_levels, scores, fits,
                      fold, has_level, has_type, masks, regions, applied, given):
    summary = {"levels_from": applied, "severity_score": settings.severity_score, "folds": settings.folds,
               "images": len(levels), "regions": int(sum(len(found) for found in regions))}
    if has_level.any():
        rows = np.flatnonzero(has_level)
        truth = [levels[i] for i in rows]
        fitted = [assign_cross_fitted(scores[i], fits, fold[i]) for i in rows]
        normal_rows = [i for i, level in enumerate(levels) if level == 0]
        summary["qwk"] = {
            "fitted": kappa_or_none(truth, fitted) if fits["all"]["cut_points"] is not None else None,
            "default": kappa_or_none(truth, [default_levels[i] for i in rows]),
            "applied": kappa_or_none(truth, [image_levels[i] for i in rows]),
            "fitted_in_sample": (kappa_or_none(truth, assign_levels(scores[rows], fits["all"]["cut_points"]))
                                 if fits["all"]["cut_points"] is not None else None),
            "applied_with_normals": kappa_or_none([levels[i] for i in list(rows) + normal_rows],
                                                  [image_levels[i] for i in list(rows) + normal_rows]),
            "images": len(rows),
            "note": "defect images with a true level 1-5 (predicted 0 when no region is found); fitted: "
                    f"cut-points fitted on the other {settings.folds - 1} of {settings.folds} folds",
        }
        summary["level_confusion"] = level_confusion(truth, [image_levels[i] for i in rows])
    if has_type.any() and fits["all"]["classifier"] is not None:
        rows = np.flatnonzero(has_type)
        truth, predicted = [types[i] for i in rows], [image_types[i] for i in rows]
        classes = fits["all"]["classifier"].classes
        summary["types"] = {"classifier": settings.type_classifier, "layers": layers,
                            "shape_features": settings.shape_features,
                            "accuracy": float(np.mean([t == p for t, p in zip(truth, predicted)])),
                            "accuracy_found": found_accuracy(truth, predicted),
                            "images": len(rows), "confusion_matrix": confusion_matrix(truth, predicted, classes),
                            "note": "type of each defect image's worst region, by a classifier fitted on the other "
                                    "folds' defects (the features of the predicted region covering most of each "
                                    "true mask, else of the mask); none: no region found (accuracy_found: among "
                                    "the images with a region)"}
    normal = [i for i, level in enumerate(levels) if level == 0]
    summary["normal_images_with_regions"] = sum(bool(regions[i]) for i in normal)
    if masks is not None:
        anomalous = [i for i in range(len(regions)) if masks[i].any()]
        truths = {i: mask_regions(masks[i]) for i in anomalous}
        summary["localisation"] = measure_hits([truths[i] for i in anomalous], [regions[i] for i in anomalous],
                                               settings.hit_iou)
        summary["localisation"]["by_type"] = {
            name: measure_hits([truths[i] for i in anomalous if types[i] == name],
                               [regions[i] for i in anomalous if types[i] == name], settings.hit_iou)["hit_rate"]
            for name in sorted({types[i] for i in anomalous if types[i] is not None})}
    return summary


def found_accuracy(truth, predicted):
    found = [(t, p) for t, p in zip(truth, predicted) if p != NO_REGION]
    return float(np.mean([t == p for t, p in found])) if found else None


def assign_cross_fitted(score, fits, fold):
    cuts = fits[int(fold)]["cut_points"] if fold >= 0 else fits["all"]["cut_points"]
    return 0 if cuts is None else int(assign_levels([score], cuts)[0])


def kappa_or_none(truth, predicted):
    kappa = quadratic_weighted_kappa(truth, predicted, IMAGE_LEVELS)
    return None if np.isnan(kappa) else kappa


def level_confusion(truth, predicted):
    matrix = np.zeros((5, 6), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[t - 1, p] += 1
    return {"rows": "true level 1-5", "columns": "predicted level 0-5", "matrix": matrix.tolist()}


def write_grading(run_dir, settings, calibration, raw_threshold, threshold, threshold_kind, summary, fit, paths,
                  regions, image_levels, image_types, levels, types):
    from omegaconf import OmegaConf

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REGION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    images = []
    for i, path in enumerate(paths):
        images.append({"image_path": path, "level": image_levels[i], "type": image_types[i],
                       "true_level": levels[i], "true_type": types[i],
                       "regions": [public_region(region) for region in regions[i]]})
        for number, region in enumerate(regions[i]):
            box, centroid = region["bbox"], region["centroid"]
            writer.writerow({"image_path": path, "region": number, "x_min": box[0], "y_min": box[1], "x_max": box[2],
                             "y_max": box[3], "centroid_x": round(centroid[0], 2), "centroid_y": round(centroid[1], 2),
                             **public_region({k: region[k] for k in REGION_COLUMNS[8:-4]}),
                             "image_level": image_levels[i], "image_type": image_types[i],
                             "true_level": levels[i], "true_type": types[i]})
    write_text_atomic(run_dir / "regions.csv", text.getvalue())
    cut_points = summary["cut_points"][summary["levels_from"]]
    model = {"settings": OmegaConf.to_container(settings, resolve=True), "calibration": calibration.describe(),
             "threshold": {"kind": threshold_kind, "raw": raw_threshold, "calibrated": threshold},
             "cut_points": cut_points, "levels_from": summary["levels_from"],
             "classifier": None if fit["classifier"] is None else fit["classifier"].describe()}
    write_text_atomic(run_dir / "grading.json", json.dumps({"model": model, "summary": summary, "images": images},
                                                           indent=1, default=float))
    log.info("grading: %d regions in %d images; levels from %s cut-points; results in %s", summary["regions"],
             len(paths), summary["levels_from"], run_dir / "regions.csv")
