# src/defectvad/grading/severity.py
# levels 1-5 from a region's severity score and four increasing cut-points: level = 1 + the number of cut-points
# at or below the score; an image without a region is level 0. Cut-points are given, fitted on labelled images
# (coordinate ascent on the quadratic weighted kappa, from the quantiles that match the true levels' shares), or
# by default the calibrated values of normal-pixel quantiles (map scores) or a doubling scale from one
# just-noticeable difference (the region's contrast in percent, CIEDE2000 and SEMU)
import numpy as np

from defectvad.errors import ConfigError
from defectvad.grading.kappa import quadratic_weighted_kappa

LEVELS = (1, 2, 3, 4, 5)
IMAGE_LEVELS = (0, 1, 2, 3, 4, 5)
DEFAULT_QUANTILES = (0.9999, 0.999999, 1 - 1e-8, 1 - 1e-10)
MAP_SCORES = ("peak_score", "mean_score")
# SEMI D31's mura levels; a CIEDE2000 of 1 and a large area's contrast of about 1 % are just noticeable too
JND_CUT_POINTS = (1.0, 2.0, 4.0, 8.0)


def check_cut_points(cut_points, key="grading.cut_points"):
    values = np.asarray(cut_points, dtype=np.float64).reshape(-1)
    if values.size != len(LEVELS) - 1 or not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
        raise ConfigError(f"{key} must be {len(LEVELS) - 1} increasing finite numbers (the calibrated scores where "
                          f"levels 2, 3, 4 and 5 start), got {list(cut_points)}")
    return values


def assign_levels(scores, cut_points):
    # scores: nan where an image has no region (level 0)
    scores = np.asarray(scores, dtype=np.float64)
    levels = np.searchsorted(np.asarray(cut_points, dtype=np.float64), np.nan_to_num(scores, nan=-np.inf),
                             side="right") + 1
    return np.where(np.isnan(scores), 0, levels)


def score_kappa(truth, scores, cut_points):
    kappa = quadratic_weighted_kappa(truth, assign_levels(scores, cut_points), IMAGE_LEVELS)
    return -np.inf if np.isnan(kappa) else kappa


def initial_cut_points(scores, truth):
    # the score quantiles at the cumulative shares of the true levels 1-4
    found = np.asarray(scores, dtype=np.float64)
    found = found[np.isfinite(found)]
    truth = np.asarray(truth)
    shares = np.array([(truth <= level).mean() for level in LEVELS[:-1]])
    cuts = np.quantile(found, np.clip(shares, 0.0, 1.0)) if found.size else np.arange(1.0, 5.0)
    for index in range(1, len(cuts)):
        cuts[index] = max(cuts[index], np.nextafter(cuts[index - 1], np.inf))
    return cuts


def fit_cut_points(scores, truth, rounds=20):
    # (cut-points, kappa on these images); candidates: midpoints between neighbouring scores and beyond both ends
    scores = np.asarray(scores, dtype=np.float64)
    found = np.unique(scores[np.isfinite(scores)])
    if found.size == 0:
        raise ConfigError("cut-points cannot be fitted: no labelled image has a defect region")
    candidates = np.concatenate([[found[0] - 1.0], (found[1:] + found[:-1]) / 2, [found[-1] + 1.0]])
    cuts = initial_cut_points(scores, truth)
    best = score_kappa(truth, scores, cuts)
    for _ in range(rounds):
        improved = False
        for index in range(len(cuts)):
            low = cuts[index - 1] if index else -np.inf
            high = cuts[index + 1] if index + 1 < len(cuts) else np.inf
            for candidate in candidates[(candidates > low) & (candidates < high)]:
                trial = cuts.copy()
                trial[index] = candidate
                kappa = score_kappa(truth, scores, trial)
                if kappa > best + 1e-12:
                    best, cuts, improved = kappa, trial, True
        if not improved:
            break
    return cuts, float(best)


def default_cut_points(calibration, quantiles=DEFAULT_QUANTILES, key="peak_score"):
    if key not in MAP_SCORES:
        return np.array(JND_CUT_POINTS)
    if len(quantiles) != len(LEVELS) - 1 or any(b <= a for a, b in zip(quantiles, quantiles[1:])):
        raise ConfigError(f"grading.default_quantiles must be {len(LEVELS) - 1} increasing normal-pixel quantiles, "
                          f"got {list(quantiles)}")
    return calibration(np.array([calibration.raw_quantile(q) for q in quantiles]))
