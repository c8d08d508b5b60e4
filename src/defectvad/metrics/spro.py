# src/defectvad/metrics/spro.py
# the saturated per-region overlap of MVTec LOCO AD, as its official evaluation computes it: each annotated defect
# (one mask file) is one region; at a threshold t (anomalous: score > t) a region's sPRO is
# min(its true positive area / its saturation area, 1); the curve is the mean sPRO of all regions against the FPR of
# all pixels that lie in no region (of the good images and of the anomalous ones), and AU-sPRO is its area up to an
# FPR limit, divided by the limit. Scores go into the bins of PixelHistogram (exact for scores rounded to 12
# significant bits), so memory stays bounded whatever the resolution
import numpy as np

from defectvad.metrics.aupro import pro_area
from defectvad.metrics.pixel_histogram import BINS, SHIFT
from defectvad.metrics.sweep import clip_unit, encode_float32, to_numpy


def saturation_area(defect_area, saturation_threshold, relative_saturation, scale=1.0):
    # relative: a share of the region's own area (rounded down, as the official code); absolute: a number of pixels of
    # the original image (scale turns it into pixels of another resolution), at most the region's area
    if relative_saturation:
        area = int(saturation_threshold * defect_area)
    else:
        area = min(saturation_threshold * scale, defect_area)
    # a region too small for its share: one pixel saturates it, where the official code would divide by zero
    return max(area, 1)


def score_bins(scores):
    # the bin code ascends as the score descends
    scores = np.ascontiguousarray(to_numpy(scores), dtype=np.float32).reshape(-1)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return (encode_float32(scores) >> SHIFT).astype(np.int64)


class SproCurves:
    # one curve per group of anomalous images (logical_anomalies, structural_anomalies); the pixels of good images
    # (group None) count in the FPR of every group
    def __init__(self):
        self.normal = {}
        self.regions = {}
        # regions without a pixel at the resolution they were judged at (left out of the mean)
        self.lost = {}

    def add(self, anomaly_map, regions=(), group=None):
        # anomaly_map (H, W); regions: (bool mask (H, W), saturation area) for each annotated defect of the image
        bins = score_bins(anomaly_map)
        defect = np.zeros(bins.size, bool)
        for mask, area in regions:
            mask = np.asarray(to_numpy(mask), bool).reshape(-1)
            if mask.size != bins.size:
                raise ValueError(f"a region mask of {mask.size} pixels does not match its map of {bins.size}")
            defect |= mask
            if not mask.any():
                self.lost[group] = self.lost.get(group, 0) + 1
                continue
            codes, counts = np.unique(bins[mask], return_counts=True)
            self.regions.setdefault(group, []).append((codes, np.concatenate([[0], np.cumsum(counts)]), float(area)))
        normal = self.normal.setdefault(group, np.zeros(BINS, np.int64))
        normal += np.bincount(bins[~defect], minlength=BINS)

    def curve(self, group, fpr_limit):
        # {"fps", "pro"} as pro_area reads them, and the number of defect-free pixels; None without regions
        negatives = self.normal.get(None, np.zeros(BINS, np.int64)) + self.normal.get(group, 0)
        regions = self.regions.get(group, [])
        n_neg = int(negatives.sum())
        if not regions or n_neg == 0:
            return None, n_neg
        levels = np.flatnonzero(negatives)
        after = np.cumsum(negatives)[levels]
        before = after - negatives[levels]
        # past the limit nothing counts; the first level that crosses it stays for the interpolation
        keep = before < fpr_limit * n_neg
        levels, before, after = levels[keep], before[keep], after[keep]
        # at each level of negative scores the curve runs from "score > level" to "score >= level" (ties in a straight
        # line); between levels it only rises, which adds no area
        above = np.zeros(levels.size)
        at = np.zeros(levels.size)
        for codes, cumulative, area in regions:
            above += np.minimum(cumulative[np.searchsorted(codes, levels, "left")] / area, 1.0)
            at += np.minimum(cumulative[np.searchsorted(codes, levels, "right")] / area, 1.0)
        fps = np.empty(2 * levels.size)
        pro = np.empty(2 * levels.size)
        fps[0::2], fps[1::2] = before, after
        pro[0::2], pro[1::2] = above / len(regions), at / len(regions)
        return {"fps": fps, "pro": pro}, n_neg

    def area(self, group, fpr_limit=0.05):
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
        points, n_neg = self.curve(group, fpr_limit)
        if points is None:
            return float("nan")
        return clip_unit(pro_area(points, n_neg, fpr_limit) / fpr_limit)

    def count_regions(self, group):
        return len(self.regions.get(group, []))
