# src/defectvad/metrics/average_precision.py
import numpy as np

from defectvad.metrics.sweep import clip_unit, sort_labels, sweep_curve


def precision_sum(points, n_pos):
    # sum of (R_n - R_{n-1}) P_n over the points, scikit-learn's definition
    tps = points["tps"]
    precision = tps[1:] / (tps[1:] + points["fps"][1:])
    return float(np.dot(np.diff(tps) / n_pos, precision))


def average_precision(scores, labels):
    keys, decode, n_pos, n_neg = sort_labels(scores, labels)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return clip_unit(sum(precision_sum(points, n_pos) for points in sweep_curve(keys, decode)))
