# src/defectvad/metrics/semu.py
# the SEMI D31 mura index (SEMU) of a display defect: its contrast over the just noticeable contrast of its area,
# JND = 1.97 / area_mm2 ** 0.33 + 0.72 (percent); SEMU 1 is a defect at the threshold of visibility
import numpy as np


def jnd_contrast_mm2(area_mm2):
    return 1.97 / np.asarray(area_mm2, dtype=np.float64) ** 0.33 + 0.72


def semu_index(contrast_pct, area_mm2):
    # contrast in percent (its sign is ignored)
    return np.abs(np.asarray(contrast_pct, dtype=np.float64)) / jnd_contrast_mm2(area_mm2)
