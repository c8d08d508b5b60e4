# src/defectvad/grading/localisation.py
# the share of true defect regions (8-connected components of the masks) hit by a predicted region: box IoU
# (inclusive pixel boxes) at or above iou; the same with the regions' pixel IoU beside it
import numpy as np


def box_iou(a, b):
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def measure_hits(true_regions, predicted_regions, iou=0.3):
    # both: one list of regions (dicts with bbox and mask) per image
    total = box_hits = mask_hits = 0
    for truths, predictions in zip(true_regions, predicted_regions):
        for truth in truths:
            total += 1
            box_hits += any(box_iou(truth["bbox"], p["bbox"]) >= iou for p in predictions)
            mask_hits += any(mask_iou(truth["mask"], p["mask"]) >= iou for p in predictions)
    return {"iou": iou, "true_regions": total, "hits": box_hits, "hit_rate": box_hits / total if total else None,
            "hits_pixel_iou": mask_hits, "hit_rate_pixel_iou": mask_hits / total if total else None}
