# src/defectvad/grading/kappa.py
# Cohen's kappa with quadratic weights: 1 - sum(w * observed) / sum(w * expected), w_ij = (i - j)^2 over the
# positions of the labels in their sorted list (as sklearn's cohen_kappa_score); nan when nothing is expected
# to disagree (one label only)
import numpy as np


def quadratic_weighted_kappa(truth, predicted, labels=None):
    truth, predicted = np.asarray(truth).reshape(-1), np.asarray(predicted).reshape(-1)
    labels = np.unique(np.concatenate([truth, predicted])) if labels is None else np.asarray(labels)
    position = {value: index for index, value in enumerate(labels.tolist())}
    count = len(labels)
    observed = np.zeros((count, count))
    for t, p in zip(truth.tolist(), predicted.tolist()):
        if t in position and p in position:
            observed[position[t], position[p]] += 1
    total = observed.sum()
    if total == 0:
        return float("nan")
    expected = np.outer(observed.sum(1), observed.sum(0)) / total
    weights = (np.arange(count)[:, None] - np.arange(count)[None, :]) ** 2
    disagreement = (weights * expected).sum()
    if disagreement == 0:
        return float("nan")
    return float(1 - (weights * observed).sum() / disagreement)
