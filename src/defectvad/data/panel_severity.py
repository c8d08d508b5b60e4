# src/defectvad/data/panel_severity.py
# severity of a panel defect from its contrast and area, in SEMU (metrics/semu.py) with a nominal 0.1 mm per
# image pixel; level 1: index < 1 (below the just noticeable contrast), 2: [1, 2), 3: [2, 4), 4: [4, 8), 5: >= 8
import numpy as np

from defectvad.metrics.semu import jnd_contrast_mm2, semu_index

PIXEL_MM = 0.1
CUT_POINTS = (1.0, 2.0, 4.0, 8.0)
LEVELS = (1, 2, 3, 4, 5)


def jnd_contrast(area_px):
    return jnd_contrast_mm2(np.asarray(area_px, dtype=np.float64) * PIXEL_MM ** 2)


def severity_index(contrast_pct, area_px):
    return semu_index(contrast_pct, np.asarray(area_px, dtype=np.float64) * PIXEL_MM ** 2)


def severity_level(contrast_pct, area_px):
    levels = np.searchsorted(CUT_POINTS, severity_index(contrast_pct, area_px), side="right") + 1
    return int(levels) if np.ndim(levels) == 0 else levels
