# src/defectvad/grading/contrast.py
# a region's contrast against its surroundings: Weber contrast (percent, signed) of the most changed channel,
# the region's mean against the mean of a ring `width` pixels wide around it (other regions left out)
import numpy as np
from scipy import ndimage

from defectvad.grading.regions import CONNECTIVITY

EPS = 1e-6


def ring_around(mask, width, exclude=None):
    ring = ndimage.binary_dilation(mask, structure=CONNECTIVITY, iterations=width) & ~mask
    if exclude is not None:
        ring &= ~exclude
    return ring


def ring_contrast(image, mask, width=4, exclude=None):
    # image: (H, W, C) in [0, 1] at the mask's size
    image = np.asarray(image, dtype=np.float64)
    ring = ring_around(mask, width, exclude)
    if not ring.any():
        return float("nan")
    inside, around = image[mask].mean(0), image[ring].mean(0)
    change = (inside - around) / np.maximum(around, EPS)
    return 100.0 * float(change[np.argmax(np.abs(change))])
