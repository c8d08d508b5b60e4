# src/defectvad/metrics/evaluation.py
import numpy as np

from defectvad.metrics.aupro import pro_area, sort_regions
from defectvad.metrics.auroc import roc_area
from defectvad.metrics.average_precision import precision_sum
from defectvad.metrics.f1_max import best_f1
from defectvad.metrics.sweep import clip_unit, sort_labels, sweep_curve

NAN = float("nan")
MAD_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def sweep_metrics(keys, decode, n_pos, n_neg, weights=None, fpr_limit=0.3):
    # AUROC, AP, F1-max (and AUPRO given region weights) from one sweep of one sort
    return curve_metrics(sweep_curve(keys, decode, weights), n_pos, n_neg, weights is not None, fpr_limit)


def curve_metrics(curve, n_pos, n_neg, with_pro=False, fpr_limit=0.3):
    # the same from the points of a curve, chunk by chunk (highest thresholds first)
    result = {"auroc": NAN, "ap": NAN, "f1max": NAN, "f1_threshold": NAN, "aupro": NAN}
    if n_pos == 0 or n_neg == 0:
        return result
    area = precision = pro = 0.0
    best = (NAN, NAN)
    for points in curve:
        area += roc_area(points, n_pos, n_neg)
        precision += precision_sum(points, n_pos)
        f1, threshold = best_f1(points, n_pos)
        if not f1 < best[0]:
            best = (f1, threshold)
        if with_pro:
            pro += pro_area(points, n_neg, fpr_limit)
    result.update(auroc=clip_unit(area), ap=clip_unit(precision), f1max=best[0], f1_threshold=best[1])
    if with_pro:
        result["aupro"] = clip_unit(pro / fpr_limit)
    return result


def compute_metrics(image_scores, image_labels, anomaly_maps=None, masks=None, fpr_limit=0.3, pixel_histogram=None):
    # pixel metrics from the maps and masks, or from a PixelHistogram that the maps were streamed into
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    image = sweep_metrics(*sort_labels(image_scores, image_labels))
    pixel = dict.fromkeys(image, NAN)
    if pixel_histogram is not None:
        pixel = pixel_histogram.metrics(fpr_limit)
    elif anomaly_maps is not None and masks is not None:
        keys, decode, weights, n_pos, n_neg = sort_regions(anomaly_maps, masks)
        pixel = sweep_metrics(keys, decode, n_pos, n_neg, weights, fpr_limit)
        del keys
    metrics = {
        "image_auroc": image["auroc"],
        "image_ap": image["ap"],
        "image_f1max": image["f1max"],
        "pixel_auroc": pixel["auroc"],
        "pixel_ap": pixel["ap"],
        "pixel_f1max": pixel["f1max"],
        "aupro": pixel["aupro"],
    }
    # a nan (one class only, or no masks) propagates into mad
    metrics["mad"] = float(np.mean([metrics[key] for key in MAD_KEYS]))
    metrics["image_f1_threshold"] = image["f1_threshold"]
    metrics["pixel_f1_threshold"] = pixel["f1_threshold"]
    return metrics
