# src/defectvad/components/kde_classifier.py
import torch
from torch import nn

from defectvad.components.gaussian_kde import GaussianKDE
from defectvad.components.pca import PCA
from defectvad.errors import ConfigError, TrainingError

FEATURE_SCALING_METHODS = ("scale", "norm")
# anomalib's fixed logistic map from log-likelihood to an anomaly probability
THRESHOLD_STEEPNESS = 0.05
THRESHOLD_OFFSET = 12


class KDEClassifier(nn.Module):
    # PCA, then scaling ("scale": by the longest training vector, "norm": each to unit length), then a
    # Gaussian KDE; the score is a probability of being anomalous
    def __init__(self, n_pca_components=16, feature_scaling_method="scale", max_training_points=40000):
        super().__init__()
        if feature_scaling_method not in FEATURE_SCALING_METHODS:
            raise ConfigError(f"model.feature_scaling_method must be one of {', '.join(FEATURE_SCALING_METHODS)}, "
                              f"got {feature_scaling_method!r}")
        self.n_pca_components = n_pca_components
        self.feature_scaling_method = feature_scaling_method
        self.max_training_points = max_training_points
        self.pca_model = PCA(n_components=n_pca_components)
        self.kde_model = GaussianKDE()
        self.register_buffer("max_length", torch.empty([]))

    def pre_process(self, feature_stack, max_length=None):
        if max_length is None:
            max_length = torch.max(torch.linalg.norm(feature_stack, ord=2, dim=1))
        if self.feature_scaling_method == "norm":
            return feature_stack / torch.linalg.norm(feature_stack, ord=2, dim=1)[:, None], max_length
        return feature_stack / max_length, max_length

    def fit(self, embeddings):
        if embeddings.shape[0] < self.n_pca_components:
            raise TrainingError(
                f"DFKDE needs at least {self.n_pca_components} training images (model.n_pca_components), "
                f"got {embeddings.shape[0]}; add images or lower model.n_pca_components"
            )
        if embeddings.shape[0] > self.max_training_points:
            keep = torch.randperm(embeddings.shape[0], device="cpu")[: self.max_training_points]
            embeddings = embeddings[keep.to(embeddings.device)]
        feature_stack, self.max_length = self.pre_process(self.pca_model.fit_transform(embeddings))
        self.kde_model.fit(feature_stack)
        return self

    def compute_kde_scores(self, features, as_log_likelihood=False):
        features, _ = self.pre_process(self.pca_model.transform(features), self.max_length)
        # 1e-300 is anomalib's guard against log(0); in float32 it vanishes, so densities that underflow give -inf
        kde_scores = self.kde_model(features) + 1e-300
        return torch.log(kde_scores) if as_log_likelihood else kde_scores

    @staticmethod
    def compute_probabilities(scores):
        return 1 / (1 + torch.exp(THRESHOLD_STEEPNESS * (scores - THRESHOLD_OFFSET)))

    def predict(self, features):
        return self.compute_probabilities(self.compute_kde_scores(features, as_log_likelihood=True))

    def forward(self, features):
        return self.predict(features)
