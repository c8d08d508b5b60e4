# src/defectvad/metrics/f1_max.py
import numpy as np

from defectvad.metrics.sweep import sort_labels, sweep_curve


def best_f1(points, n_pos):
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); on equal F1 the lowest threshold
    # wins, as with argmax over scikit-learn's ascending thresholds
    tps = points["tps"][1:]
    f1 = 2 * tps / (tps + points["fps"][1:] + n_pos)
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(points["thresholds"][best])


def f1_max_threshold(scores, labels):
    keys, decode, n_pos, n_neg = sort_labels(scores, labels)
    best = (float("nan"), float("nan"))
    if n_pos == 0 or n_neg == 0:
        return best
    for points in sweep_curve(keys, decode):
        f1, threshold = best_f1(points, n_pos)
        if not f1 < best[0]:  # later chunks hold lower thresholds
            best = (f1, threshold)
    return best


def f1_max(scores, labels):
    return f1_max_threshold(scores, labels)[0]
