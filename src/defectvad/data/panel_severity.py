# src/defectvad/data/panel_severity.py
# severity of a panel defect from its contrast and area, in SEMU (SEMI D31): contrast over the just noticeable
# contrast of its area, JND = 1.97 / area_mm2 ** 0.33 + 0.72 (percent), with a nominal 0.1 mm per image pixel;
# level 1: index < 1 (below the just noticeable contrast), 2: [1, 2), 3: [2, 4), 4: [4, 8), 5: >= 8
import numpy as np

PIXEL_MM = 0.1
CUT_POINTS = (1.0, 2.0, 4.0, 8.0)
LEVELS = (1, 2, 3, 4, 5)


def jnd_contrast(area_px):
    area_mm2 = np.asarray(area_px, dtype=np.float64) * PIXEL_MM ** 2
    return 1.97 / area_mm2 ** 0.33 + 0.72


def severity_index(contrast_pct, area_px):
    return np.abs(np.asarray(contrast_pct, dtype=np.float64)) / jnd_contrast(area_px)


def severity_level(contrast_pct, area_px):
    levels = np.searchsorted(CUT_POINTS, severity_index(contrast_pct, area_px), side="right") + 1
    return int(levels) if np.ndim(levels) == 0 else levels
