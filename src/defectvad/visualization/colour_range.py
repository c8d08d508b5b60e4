# src/defectvad/visualization/colour_range.py
# one colour range for every heatmap of a run, from the normal images' map pixels (held-out normals, else the
# normal test images): from their 1st percentile up to twice their 99.9th percentile's distance above it, so the
# normal tail sits mid-scale and anomalies above it run to red; one extreme map no longer sets the scale.
# Without normal images: the 1st and 99th percentiles of all the maps' pixels
import numpy as np

LOW_QUANTILE, HIGH_QUANTILE, STRETCH = 0.01, 0.999, 2.0
MAX_VALUES = 4_000_000


def sample_values(maps, seed=0):
    values = np.asarray(maps, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size > MAX_VALUES:
        values = np.random.default_rng(seed).choice(values, MAX_VALUES, replace=False)
    return values


def choose_map_range(maps, normal_maps=None):
    # (low, high, note)
    normal = None if normal_maps is None else sample_values(normal_maps)
    if normal is not None and normal.size:
        low, top = np.quantile(normal, [LOW_QUANTILE, HIGH_QUANTILE])
        high = low + STRETCH * (top - low)
        note = (f"normal images' map pixels: from their {LOW_QUANTILE:g} quantile to that plus {STRETCH:g} x the "
                f"distance to their {HIGH_QUANTILE:g} quantile")
    else:
        values = sample_values(maps)
        low, high = np.quantile(values, [0.01, 0.99]) if values.size else (0.0, 1.0)
        note = "no normal images: the 0.01 and 0.99 quantiles of all test map pixels"
    if not high > low:
        high = low + 1.0
    return [float(low), float(high)], note
