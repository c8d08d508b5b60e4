# src/defectvad/metrics/aupro.py
import numpy as np
from scipy import ndimage

from defectvad.metrics.sweep import binarize, clip_unit, sort_scores, sweep_curve, to_numpy

# regions are the 8-connected components of each image's mask (diagonal pixels touch);
# the middle plane of this 3-D structure links pixels within an image, never across images
EIGHT_CONNECTED = np.zeros((3, 3, 3), bool)
EIGHT_CONNECTED[1] = True


def label_regions(masks):
    # masks (N, H, W) bool -> region id per pixel (0 normal), and the weight of each id:
    # 1 / (n_regions * region size), so that the weights of all region pixels sum to 1
    regions, n_regions = ndimage.label(masks, structure=EIGHT_CONNECTED)
    sizes = np.bincount(regions[masks], minlength=n_regions + 1)
    weights = np.zeros(n_regions + 1)
    if n_regions:
        weights[1:] = 1.0 / (n_regions * sizes[1:])
    return regions, weights


def sort_regions(anomaly_maps, masks):
    anomaly_maps = to_numpy(anomaly_maps)
    masks = binarize(masks)
    height, width = anomaly_maps.shape[-2:]
    if masks.size != anomaly_maps.size or masks.shape[-2:] != (height, width):
        raise ValueError(f"masks of shape {masks.shape} do not match maps of shape {anomaly_maps.shape}")
    masks = masks.reshape(-1, height, width)
    regions, weights = label_regions(masks)
    keys, decode = sort_scores(anomaly_maps, regions)
    n_pos = int(np.count_nonzero(masks))
    return keys, decode, weights, n_pos, masks.size - n_pos


def pro_area(points, n_neg, fpr_limit):
    # trapezoids of PRO over FPR, cut at fpr_limit with the PRO there interpolated
    fpr = points["fps"] / n_neg
    pro = points["pro"]
    f0, f1, p0, p1 = fpr[:-1], fpr[1:], pro[:-1], pro[1:]
    inside = f1 <= fpr_limit
    area = float(np.dot(f1[inside] - f0[inside], p0[inside] + p1[inside])) / 2
    cut = (f0 < fpr_limit) & (f1 > fpr_limit)
    if cut.any():
        f0, f1, p0, p1 = f0[cut], f1[cut], p0[cut], p1[cut]
        p_limit = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
        area += float(np.dot(fpr_limit - f0, p0 + p_limit)) / 2
    return area


def aupro(anomaly_maps, masks, fpr_limit=0.3):
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    keys, decode, weights, n_pos, n_neg = sort_regions(anomaly_maps, masks)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    area = sum(pro_area(points, n_neg, fpr_limit) for points in sweep_curve(keys, decode, weights))
    return clip_unit(area / fpr_limit)
