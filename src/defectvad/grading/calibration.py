# src/defectvad/grading/calibration.py
# anomaly maps on the normal images' scale (the percentile rule): (m - median) / (q-quantile - median) of the
# normal pixels, so a normal median is 0 and the normal q-quantile 1. Above the normal 0.99 quantile the pixel
# tail is modelled as exponential (scale: the mean excess), so that quantiles beyond the largest normal pixel
# (1 - 1e-6, ...) have a value
import math

import numpy as np

from defectvad.errors import ConfigError

TAIL_START = 0.99
GRID_SIZE = 1001
EPS = 1e-12


class MapCalibration:
    def __init__(self, shift=0.0, scale=1.0, tail_start=0.0, tail_scale=1.0, grid=None, quantile=0.999):
        self.shift, self.scale = shift, scale
        self.tail_start, self.tail_scale = tail_start, tail_scale
        self.grid = grid
        self.quantile = quantile

    def fit(self, normal_maps, quantile=0.999):
        if not 0.5 < quantile < 1:
            raise ConfigError(f"grading.calibration_quantile must lie between 0.5 and 1, got {quantile}")
        values = np.asarray(normal_maps, dtype=np.float64).reshape(-1)
        if values.size == 0:
            raise ConfigError("grading needs normal images to calibrate the maps: set evaluation.holdout (e.g. 10) "
                              "or keep normal images in the test set")
        self.quantile = quantile
        self.shift = float(np.quantile(values, 0.5))
        self.scale = float(max(np.quantile(values, quantile) - self.shift, EPS))
        self.tail_start = float(np.quantile(values, TAIL_START))
        excess = values[values > self.tail_start] - self.tail_start
        self.tail_scale = float(max(excess.mean() if excess.size else self.scale, EPS))
        self.grid = np.quantile(values, np.linspace(0, 1, GRID_SIZE)).tolist()
        return self

    def __call__(self, values):
        return (np.asarray(values, dtype=np.float64) - self.shift) / self.scale

    def raw_quantile(self, q):
        # the q-quantile of normal pixels, raw: read off the grid up to TAIL_START, the exponential tail above it
        if not 0 < q < 1:
            raise ConfigError(f"grading.default_quantiles must lie strictly between 0 and 1, got {q}")
        if q <= TAIL_START:
            return float(np.interp(q, np.linspace(0, 1, len(self.grid)), self.grid))
        return self.tail_start + self.tail_scale * math.log((1 - TAIL_START) / (1 - q))

    def describe(self):
        return {"rule": "percentile", "shift": self.shift, "scale": self.scale, "quantile": self.quantile,
                "tail_start": self.tail_start, "tail_scale": self.tail_scale, "grid": self.grid}

    @classmethod
    def from_dict(cls, values):
        return cls(values["shift"], values["scale"], values["tail_start"], values["tail_scale"], values["grid"],
                   values["quantile"])
