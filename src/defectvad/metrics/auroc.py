# src/defectvad/metrics/auroc.py
import numpy as np

from defectvad.metrics.sweep import clip_unit, sort_labels, sweep_curve


def roc_area(points, n_pos, n_neg):
    # trapezoids between consecutive ROC points, as a fraction of the unit square
    tpr = points["tps"] / n_pos
    fpr = points["fps"] / n_neg
    return float(np.dot(np.diff(fpr), tpr[1:] + tpr[:-1])) / 2


def auroc(scores, labels):
    keys, decode, n_pos, n_neg = sort_labels(scores, labels)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return clip_unit(sum(roc_area(points, n_pos, n_neg) for points in sweep_curve(keys, decode)))
