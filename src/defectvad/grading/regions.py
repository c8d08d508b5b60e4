# src/defectvad/grading/regions.py
# defect regions: 8-connected components of the calibrated map at or above a threshold, with at least min_area
# pixels; with extent > 0 each is then trimmed to its pixels at or above extent x its peak (half the peak by
# default: a strong defect's component spreads far beyond it at a threshold set for faint ones). Boxes are
# inclusive pixel bounds [x_min, y_min, x_max, y_max], centroids (x, y)
import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3), dtype=bool)


def label_components(binary):
    labels, count = ndimage.label(np.asarray(binary, dtype=bool), structure=CONNECTIVITY)
    return labels, ndimage.find_objects(labels), count


def find_regions(calibrated, threshold, min_area=1, extent=0.0):
    # regions in order of their peak score, highest first; each keeps its boolean mask
    calibrated = np.asarray(calibrated, dtype=np.float64)
    height, width = calibrated.shape
    labels, slices, _ = label_components(calibrated >= threshold)
    regions = []
    for index, box in enumerate(slices, 1):
        inside = labels[box] == index
        if int(inside.sum()) < min_area:
            continue
        if extent > 0:
            inside &= calibrated[box] >= extent * calibrated[box][inside].max()
        area = int(inside.sum())
        ys, xs = np.nonzero(inside)
        ys, xs = ys + box[0].start, xs + box[1].start
        values = calibrated[ys, xs]
        mask = np.zeros((height, width), dtype=bool)
        mask[ys, xs] = True
        regions.append({"mask": mask, "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                        "centroid": [float(xs.mean()), float(ys.mean())], "area_px": area,
                        "area_pct": 100.0 * area / (height * width), "peak_score": float(values.max()),
                        "mean_score": float(values.mean())})
    regions.sort(key=lambda region: -region["peak_score"])
    return regions


def mask_regions(mask):
    # the true defect regions of a ground-truth mask: its 8-connected components
    labels, slices, _ = label_components(np.asarray(mask) > 0)
    regions = []
    for index, box in enumerate(slices, 1):
        region = labels == index
        ys, xs = np.nonzero(region)
        regions.append({"mask": region, "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]})
    return regions
