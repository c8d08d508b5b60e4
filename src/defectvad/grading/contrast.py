# src/defectvad/grading/contrast.py
# a region against its surroundings, a ring `width` pixels wide around it (other regions left out): the Weber
# contrast (percent, signed) of the most changed channel, and the CIEDE2000 colour difference of their mean colours
import numpy as np
import torch
from scipy import ndimage

from defectvad.grading.regions import CONNECTIVITY
from defectvad.metrics.ciede2000 import delta_e2000

EPS = 1e-6


def ring_around(mask, width, exclude=None):
    ring = ndimage.binary_dilation(mask, structure=CONNECTIVITY, iterations=width) & ~mask
    if exclude is not None:
        ring &= ~exclude
    return ring


def weber_contrast(image, mask, ring):
    # image: (H, W, C) in [0, 1] at the mask's size
    if not ring.any():
        return float("nan")
    image = np.asarray(image, dtype=np.float64)
    inside, around = image[mask].mean(0), image[ring].mean(0)
    change = (inside - around) / np.maximum(around, EPS)
    return 100.0 * float(change[np.argmax(np.abs(change))])


def ring_contrast(image, mask, width=4, exclude=None):
    return weber_contrast(image, mask, ring_around(mask, width, exclude))


def colour_difference(image, mask, ring):
    # CIEDE2000 between the region's and the ring's mean sRGB colours (a grey image counts as neutral colour)
    if not ring.any():
        return float("nan")
    image = np.asarray(image, dtype=np.float64)
    colours = np.stack([image[mask].mean(0), image[ring].mean(0)])
    colours = torch.from_numpy(np.broadcast_to(colours, (2, 3)).copy()).clamp(0, 1)[:, :, None]
    return float(delta_e2000(colours[:1], colours[1:])[0, 0])
