# src/defectvad/models/ensemble/fusion.py
# fusion of the members' calibrated values (member axis dim 1): mean, max, weighted (a weighted mean, weights
# on the simplex chosen on the validation split), rank (the mean of each member's rank among its own normal
# values) and logistic (a logistic regression on the calibrated values, fitted on the validation split; the
# fused value is its log-odds)
import itertools

import numpy as np
import torch
from torch import nn

from defectvad.errors import ConfigError
from defectvad.metrics.auroc import auroc

FUSIONS = ("mean", "max", "weighted", "rank", "logistic")
LEARNED = ("weighted", "logistic")


def check_fusion(rule, key):
    if rule not in FUSIONS:
        raise ConfigError(f"{key} must be one of: {', '.join(FUSIONS)}; got '{rule}'")
    return rule


def simplex_grid(num_members, step):
    # every weight vector with entries in multiples of step that sum to 1
    parts = round(1 / step)
    if parts < 1 or abs(parts * step - 1) > 1e-9:
        raise ConfigError(f"model.weight_step must divide 1 (0.1, 0.05, 0.25 ...), got {step}")
    for cut in itertools.product(range(parts + 1), repeat=num_members - 1):
        if sum(cut) <= parts:
            yield np.array([*cut, parts - sum(cut)], dtype=np.float64) / parts


def choose_weights(values, labels, step=0.1):
    # values (N, M) calibrated, labels (N,): the weights of the grid with the highest AUROC; equal weights
    # win ties, then the grid's order
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    count = values.shape[1]
    best_weights = np.full(count, 1.0 / count)
    best = auroc(values @ best_weights, labels)
    for weights in simplex_grid(count, step):
        found = auroc(values @ weights, labels)
        if found > best + 1e-12:
            best, best_weights = found, weights
    return best_weights, best


def fit_logistic(values, labels, seed=0):
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise ConfigError("the logistic fusion needs normal and anomalous validation images; the validation split "
                          "has one kind only")
    model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    model.fit(np.asarray(values, dtype=np.float64), labels)
    return model.coef_[0], float(model.intercept_[0])


class MemberFusion(nn.Module):
    def __init__(self, num_members, rule="mean"):
        super().__init__()
        self.rule = rule
        self.register_buffer("weights", torch.full((num_members,), 1.0 / num_members))
        self.register_buffer("coef", torch.zeros(num_members))
        self.register_buffer("intercept", torch.zeros(1))

    def forward(self, calibrated, ranks=None):
        shape = (1, -1) + (1,) * (calibrated.dim() - 2)
        if self.rule == "mean":
            return calibrated.mean(dim=1)
        if self.rule == "max":
            return calibrated.amax(dim=1)
        if self.rule == "weighted":
            return (calibrated * self.weights.view(shape)).sum(dim=1)
        if self.rule == "rank":
            return ranks.mean(dim=1)
        return (calibrated * self.coef.view(shape)).sum(dim=1) + self.intercept

    def fit(self, values, labels, step=0.1, seed=0):
        # values (N, M) calibrated validation values with their labels; only the learned rules learn
        if self.rule == "weighted":
            weights, found = choose_weights(values, labels, step)
            self.weights.copy_(torch.as_tensor(weights, dtype=self.weights.dtype))
            return {"validation_auroc": found}
        if self.rule == "logistic":
            coef, intercept = fit_logistic(values, labels, seed)
            self.coef.copy_(torch.as_tensor(coef, dtype=self.coef.dtype))
            self.intercept.fill_(intercept)
            return {"validation_auroc": auroc(np.asarray(values, dtype=np.float64) @ coef + intercept, labels)}
        return {}

    def describe(self):
        if self.rule == "weighted":
            return {"rule": self.rule, "weights": self.weights.tolist()}
        if self.rule == "logistic":
            return {"rule": self.rule, "coef": self.coef.tolist(), "intercept": float(self.intercept)}
        return {"rule": self.rule}
