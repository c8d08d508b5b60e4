# src/defectvad/metrics/pixel_histogram.py
# pixel metrics for maps too large to keep all at once (tiled and full-resolution runs): each image's map adds its
# pixels to counts over score bins, and AUROC, AP, F1-max and AUPRO come from the same curve code as the exact
# metrics. A bin is the top BITS bits of the float32 order code (sign, exponent and the first 11 mantissa bits), so
# the metrics are exact for scores rounded down to 12 significant bits (relative bin width 2^-11 at most); memory is
# three arrays of 2^20 bins, whatever the number and size of the images
import numpy as np
from scipy import ndimage

from defectvad.metrics.evaluation import curve_metrics
from defectvad.metrics.sweep import binarize, decode_float32, encode_float32, to_numpy

BITS = 20
SHIFT = 32 - BITS
BINS = 1 << BITS
# 8-connected regions, as the exact AUPRO
EIGHT_CONNECTED = np.ones((3, 3), bool)


class PixelHistogram:
    def __init__(self):
        self.normal = np.zeros(BINS, np.int64)
        self.anomalous = np.zeros(BINS, np.int64)
        # per bin, the sum over its defect pixels of 1 / (their region's size): a region adds 1 in all
        self.region_share = np.zeros(BINS)
        self.regions = 0

    def add(self, anomaly_map, mask):
        scores = to_numpy(anomaly_map).astype(np.float32, copy=False)
        mask = binarize(mask)
        if scores.shape != mask.shape:
            raise ValueError(f"a map of shape {scores.shape} does not match its mask of shape {mask.shape}")
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        # the code ascends as the score descends, so bins run from the highest scores to the lowest
        bins = (encode_float32(scores.reshape(-1)) >> SHIFT).astype(np.int64)
        defect = mask.reshape(-1)
        self.normal += np.bincount(bins[~defect], minlength=BINS)
        self.anomalous += np.bincount(bins[defect], minlength=BINS)
        regions, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        if count:
            regions = regions.reshape(-1)[defect]
            sizes = np.bincount(regions)
            self.region_share += np.bincount(bins[defect], weights=1.0 / sizes[regions], minlength=BINS)
            self.regions += count

    def curve(self):
        # one chunk of points as sweep_curve gives them: the threshold of a bin is its lowest score
        used = np.flatnonzero(self.normal + self.anomalous)
        tps = np.cumsum(self.anomalous)[used]
        fps = np.cumsum(self.normal)[used]
        pro = np.cumsum(self.region_share)[used] / max(self.regions, 1)
        lowest = (used.astype(np.uint32) << np.uint32(SHIFT)) | np.uint32((1 << SHIFT) - 1)
        yield {"thresholds": decode_float32(lowest), "tps": np.concatenate([[0], tps]),
               "fps": np.concatenate([[0], fps]), "pro": np.concatenate([[0.0], pro])}

    def metrics(self, fpr_limit=0.3):
        return curve_metrics(self.curve(), int(self.anomalous.sum()), int(self.normal.sum()), True, fpr_limit)
