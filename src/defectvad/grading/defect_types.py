# src/defectvad/grading/defect_types.py
# the defect type of a region from its pooled features: nearest centroid (Euclidean, on features standardised
# with the training examples' mean and std) or multinomial logistic regression on the same; both kept as plain
# arrays, so that a run folder's grading.json restores them
import numpy as np

from defectvad.errors import ConfigError

CLASSIFIERS = ("nearest_centroid", "logistic")
NO_REGION = "none"
EPS = 1e-6


class TypeClassifier:
    def __init__(self, kind="nearest_centroid", seed=0):
        if kind not in CLASSIFIERS:
            raise ConfigError(f"grading.type_classifier must be one of: {', '.join(CLASSIFIERS)}; got '{kind}'")
        self.kind, self.seed = kind, seed
        self.classes, self.mean, self.std, self.weights, self.bias = [], None, None, None, None

    def standardise(self, features):
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.std

    def fit(self, features, labels):
        features = np.asarray(features, dtype=np.float64)
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ConfigError(f"a defect-type classifier needs labelled examples of 2 types or more, got "
                              f"{self.classes}")
        self.mean, self.std = features.mean(0), features.std(0) + EPS
        x = self.standardise(features)
        y = np.array([self.classes.index(label) for label in labels])
        if self.kind == "nearest_centroid":
            # argmin |x - c|^2 = argmax x.c - |c|^2 / 2: a linear rule like the logistic one
            centroids = np.stack([x[y == index].mean(0) for index in range(len(self.classes))])
            self.weights, self.bias = centroids, -0.5 * (centroids ** 2).sum(1)
        else:
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(max_iter=2000, random_state=self.seed).fit(x, y)
            weights, bias = model.coef_, model.intercept_
            if len(self.classes) == 2:
                weights, bias = np.stack([-weights[0] / 2, weights[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
            self.weights, self.bias = weights, bias
        return self

    def predict(self, features):
        features = np.asarray(features, dtype=np.float64).reshape(-1, len(self.mean))
        decision = self.standardise(features) @ self.weights.T + self.bias
        return [self.classes[index] for index in decision.argmax(1)]

    def describe(self):
        return {"kind": self.kind, "classes": self.classes, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, values):
        classifier = cls(values["kind"])
        classifier.classes = list(values["classes"])
        classifier.mean, classifier.std = np.array(values["mean"]), np.array(values["std"])
        classifier.weights, classifier.bias = np.array(values["weights"]), np.array(values["bias"])
        return classifier


def confusion_matrix(truth, predicted, classes):
    # rows: true types; columns: predicted types, then "none" (no region found)
    columns = list(classes) + [NO_REGION]
    matrix = np.zeros((len(classes), len(columns)), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[list(classes).index(t), columns.index(p if p in columns else NO_REGION)] += 1
    return {"rows": list(classes), "columns": columns, "matrix": matrix.tolist()}
