# src/defectvad/grading/images.py
# grading one image: regions of its calibrated map, each with its contrast, colour difference and SEMI mura index
# in the picture, severity score, level and type
import math

import numpy as np

from defectvad.data.transforms import to_size_pair
from defectvad.grading.contrast import colour_difference, ring_around, weber_contrast
from defectvad.grading.defect_types import NO_REGION
from defectvad.grading.regions import find_regions
from defectvad.grading.severity import assign_levels
from defectvad.metrics.semu import semu_index

# the region value a level is cut from: contrast is |contrast_pct|
SEVERITY_SCORES = ("peak_score", "mean_score", "contrast", "delta_e2000", "semu")


def map_pixel_area_mm2(original_size, transform, map_size, pixel_mm):
    # the area in mm2 of the part of the image file under one map pixel: original_size (width, height) of the file,
    # which the transform resized to image_size and centre-cropped (or not), and the map covers at map_size (h, w)
    width, height = original_size
    resized = to_size_pair(transform.image_size, "transform.image_size")
    crop = resized if transform.get("center_crop") is None else to_size_pair(transform.center_crop,
                                                                                 "transform.center_crop")
    return (height / resized[0] * crop[0] / map_size[0]) * (width / resized[1] * crop[1] / map_size[1]) * pixel_mm ** 2


def describe_regions(calibrated, picture, threshold, min_area, ring_width, extent=0.0, pixel_area_mm2=0.01):
    # picture: (H, W, C) in [0, 1] at the map's size
    regions = find_regions(calibrated, threshold, min_area, extent)
    everything = np.zeros(np.shape(calibrated), dtype=bool)
    for region in regions:
        everything |= region["mask"]
    for region in regions:
        ring = ring_around(region["mask"], ring_width, everything)
        region["contrast_pct"] = weber_contrast(picture, region["mask"], ring)
        region["delta_e2000"] = colour_difference(picture, region["mask"], ring)
        region["semu"] = float(semu_index(region["contrast_pct"], region["area_px"] * pixel_area_mm2))
    return regions


def severity_scores(regions, key):
    if key == "contrast":
        return np.array([abs(region["contrast_pct"]) for region in regions], dtype=np.float64)
    return np.array([region[key] for region in regions], dtype=np.float64)


def grade_regions(regions, features, key, cut_points, classifier=None):
    # sets each region's level and type; (image level, image type): those of its worst region
    scores = np.nan_to_num(severity_scores(regions, key), nan=-np.inf)
    levels = assign_levels(scores, cut_points) if regions else []
    types = classifier.predict(features) if classifier is not None and regions else [None] * len(regions)
    for region, score, level, defect_type in zip(regions, scores, levels, types):
        region["severity_score"], region["level"], region["type"] = float(score), int(level), defect_type
    if not regions:
        return 0, NO_REGION
    worst = int(np.argmax(scores))
    return int(levels[worst]), types[worst]


def worst_score(regions, key):
    # the image's severity score: its worst region's (nan without a region)
    return float(np.nanmax(severity_scores(regions, key))) if regions else float("nan")


def public_region(region):
    # without its mask, and null where a value is not finite (a region without a ring has no contrast)
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in region.items() if key != "mask"}
