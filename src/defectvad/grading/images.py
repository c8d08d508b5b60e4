# src/defectvad/grading/images.py
# grading one image: regions of its calibrated map, each with its contrast in the picture, severity score,
# level and type
import numpy as np

from defectvad.grading.contrast import ring_contrast
from defectvad.grading.defect_types import NO_REGION
from defectvad.grading.regions import find_regions
from defectvad.grading.severity import assign_levels

SEVERITY_SCORES = ("peak_score", "mean_score", "contrast")


def describe_regions(calibrated, picture, threshold, min_area, ring_width, extent=0.0):
    # picture: (H, W, C) in [0, 1] at the map's size
    regions = find_regions(calibrated, threshold, min_area, extent)
    everything = np.zeros(np.shape(calibrated), dtype=bool)
    for region in regions:
        everything |= region["mask"]
    for region in regions:
        region["contrast_pct"] = ring_contrast(picture, region["mask"], ring_width, everything)
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
    return {key: value for key, value in region.items() if key != "mask"}
