# src/defectvad/models/dfm/torch_model.py
import math

import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.components.pca import PCA
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError

SCORE_TYPES = ("fre", "nll")


class SingleClassGaussian(DynamicBufferMixin):
    # a Gaussian kept as mean and SVD factors; score_samples is the negative log-likelihood up to constants
    def __init__(self):
        super().__init__()
        self.register_buffer("mean_vec", torch.empty(0))
        self.register_buffer("u_mat", torch.empty(0))
        self.register_buffer("sigma_mat", torch.empty(0))

    def fit(self, dataset):
        # dataset: (features, samples)
        num_samples = dataset.shape[1]
        self.mean_vec = torch.mean(dataset, dim=1)
        data_centered = (dataset - self.mean_vec.reshape(-1, 1)) / math.sqrt(num_samples)
        self.u_mat, self.sigma_mat, _ = torch.linalg.svd(data_centered, full_matrices=False)
        return self

    def score_samples(self, features):
        transformed = torch.matmul(features - self.mean_vec, self.u_mat / self.sigma_mat)
        return torch.sum(transformed * transformed, dim=1) + 2 * torch.sum(torch.log(self.sigma_mat))

    def forward(self, dataset):
        return self.fit(dataset)


class DFMModel(nn.Module):
    def __init__(self, backbone="resnet50", layer=None, weights_path=None, pooling_kernel_size=4,
                 n_comps=0.97, score_type="fre"):
        super().__init__()
        if score_type not in SCORE_TYPES:
            raise ConfigError(f"model.score_type must be one of {', '.join(SCORE_TYPES)}, got {score_type!r}")
        self.backbone = backbone
        self.layer = resolve_layers(backbone, [layer] if layer else None, (2,))[0]
        self.pooling_kernel_size = pooling_kernel_size
        self.n_components = n_comps
        self.score_type = score_type
        self.pca_model = PCA(n_components=n_comps)
        self.gaussian_model = SingleClassGaussian()
        self.feature_extractor = FeatureExtractor(backbone, [self.layer], weights_path=weights_path).eval()
        self.memory_bank = []

    def fit(self):
        if not self.memory_bank:
            raise TrainingError("DFM saw no training images; check the training set")
        memory_bank = torch.vstack(self.memory_bank)
        self.memory_bank = []
        self.pca_model.fit(memory_bank)
        if self.score_type == "nll":
            # anomalib centres the bank twice here (its PCA works in place) and its Gaussian fit fails
            # (2.7); this projects the features as scoring does
            features_reduced = self.pca_model.transform(memory_bank)
            self.gaussian_model.fit(features_reduced.T)

    def score(self, features, feature_shapes):
        projected = self.pca_model.transform(features)
        if self.score_type == "nll":
            return self.gaussian_model.score_samples(projected), None
        # feature reconstruction error, in the centred space
        squared_error = torch.square(features - self.pca_model.mean - self.pca_model.inverse_transform(projected))
        score_map = torch.sum(squared_error.reshape(feature_shapes), dim=1, keepdim=True)
        return torch.sum(squared_error, dim=1), score_map

    def get_features(self, images):
        with torch.no_grad():
            features = self.feature_extractor(images)[self.layer]
            if self.pooling_kernel_size > 1:
                features = F.avg_pool2d(input=features, kernel_size=self.pooling_kernel_size)
        return features.reshape(len(features), -1), features.shape

    def forward(self, images):
        features, feature_shapes = self.get_features(images)
        if self.training:
            self.memory_bank.append(features)
            return features
        pred_score, score_map = self.score(features, feature_shapes)
        if score_map is None:
            # nll scores whole images: the map is the image score everywhere (pixel metrics mean nothing)
            anomaly_map = pred_score.reshape(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:]).contiguous()
        else:
            anomaly_map = F.interpolate(score_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score, anomaly_map)
