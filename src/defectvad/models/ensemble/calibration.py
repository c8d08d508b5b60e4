# src/defectvad/models/ensemble/calibration.py
# each member's raw values (image scores or map pixels) put on one scale, from the member's values on held-out
# normal images: zscore (v - mean) / std; percentile (v - median) / (q-quantile - median), so a normal median
# is 0 and the normal q-quantile 1; none leaves them raw. rank: the fractional rank of a value among the normal
# values, read off a grid of their quantiles (0 at or below the smallest, 1 at or above the largest)
import numpy as np
import torch
from torch import nn

from defectvad.errors import ConfigError

CALIBRATIONS = ("zscore", "percentile", "none")
GRID_SIZE = 1001
EPS = 1e-12


def check_calibration(rule, quantile):
    if rule not in CALIBRATIONS:
        raise ConfigError(f"model.calibration must be one of: {', '.join(CALIBRATIONS)}; got '{rule}'")
    if not 0.5 < quantile < 1:
        raise ConfigError(f"model.calibration_quantile must lie between 0.5 and 1 (the normal quantile that "
                          f"calibrates to 1), got {quantile}")


def fit_shift_scale(values, rule, quantile):
    # values: one member's normal values, any shape; (shift, scale) in float64
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if rule == "zscore":
        shift, scale = values.mean(), values.std()
    elif rule == "percentile":
        shift = np.quantile(values, 0.5)
        scale = np.quantile(values, quantile) - shift
    else:
        shift, scale = 0.0, 1.0
    return float(shift), float(max(scale, EPS))


def fit_grid(values, size=GRID_SIZE):
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.quantile(values, np.linspace(0, 1, size))


def interpolate_rank(values, grid):
    # values (...,), grid (G,) ascending -> fractional rank in [0, 1], linear between grid points
    size = grid.numel()
    flat = values.reshape(-1).contiguous()
    upper = torch.searchsorted(grid, flat, right=True).clamp(1, size - 1)
    low, high = grid[upper - 1], grid[upper]
    span = high - low
    step = torch.where(span > 0, (flat - low) / span.clamp_min(EPS), (flat >= high).to(flat.dtype))
    rank = (upper - 1 + step.clamp(0, 1)) / (size - 1)
    rank = torch.where(flat < grid[0], torch.zeros_like(rank), rank)
    return rank.reshape(values.shape)


class MemberCalibration(nn.Module):
    # one per value kind (image scores, map pixels); the member axis is dim 1 of what it calibrates
    def __init__(self, num_members, rule="zscore", quantile=0.99):
        super().__init__()
        check_calibration(rule, quantile)
        self.rule = rule
        self.quantile = quantile
        self.register_buffer("shift", torch.zeros(num_members))
        self.register_buffer("scale", torch.ones(num_members))
        self.register_buffer("grid", torch.zeros(num_members, GRID_SIZE))

    def fit(self, normal_values):
        # normal_values: one array per member of its values on held-out normal images
        for index, values in enumerate(normal_values):
            shift, scale = fit_shift_scale(values, self.rule, self.quantile)
            self.shift[index], self.scale[index] = shift, scale
            self.grid[index] = torch.as_tensor(fit_grid(values), dtype=self.grid.dtype)
        return self

    def forward(self, values):
        shape = (1, -1) + (1,) * (values.dim() - 2)
        return (values - self.shift.view(shape)) / self.scale.view(shape)

    def rank(self, values):
        return torch.stack([interpolate_rank(values[:, index], self.grid[index])
                            for index in range(values.shape[1])], dim=1)

    def describe(self):
        return {"rule": self.rule, "shift": self.shift.tolist(), "scale": self.scale.tolist(),
                **({"quantile": self.quantile} if self.rule == "percentile" else {})}
