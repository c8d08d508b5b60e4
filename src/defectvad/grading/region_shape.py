# src/defectvad/grading/region_shape.py
# a region's shape and contrast as features beside the pooled backbone ones (grading.shape_features): log area,
# log of the box's width over height, the share of its box it fills, its signed ring contrast
import math

import numpy as np


def describe_shape(region):
    x_min, y_min, x_max, y_max = region["bbox"]
    width, height = x_max - x_min + 1, y_max - y_min + 1
    contrast = region.get("contrast_pct", 0.0)
    return np.array([math.log(region["area_px"]), math.log(width / height), region["area_px"] / (width * height),
                     0.0 if math.isnan(contrast) else contrast])
