# src/defectvad/models/dfkde/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.kde_classifier import KDEClassifier
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import TrainingError


class DfkdeModel(nn.Module):
    def __init__(self, backbone="resnet18", layers=None, weights_path=None, n_pca_components=16,
                 feature_scaling_method="scale", max_training_points=40000):
        super().__init__()
        self.layers = resolve_layers(backbone, layers, (3,))
        self.feature_extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        self.classifier = KDEClassifier(n_pca_components=n_pca_components,
                                        feature_scaling_method=feature_scaling_method,
                                        max_training_points=max_training_points)
        self.memory_bank = []

    def get_features(self, images):
        outputs = self.feature_extractor(images)
        pooled = [F.adaptive_avg_pool2d(outputs[layer], output_size=(1, 1)).flatten(1) for layer in self.layers]
        # one vector per image; anomalib stacks layers along the batch axis, the same for its single layer
        return torch.cat(pooled, dim=1).detach()

    def forward(self, images):
        features = self.get_features(images)
        if self.training:
            self.memory_bank.append(features)
            return features
        scores = self.classifier(features)
        # DFKDE scores whole images: the map is the image score everywhere (pixel metrics mean nothing)
        anomaly_map = scores.reshape(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:]).contiguous()
        return InferenceBatch(scores, anomaly_map)

    def fit(self):
        if not self.memory_bank:
            raise TrainingError("DFKDE saw no training images; check the training set")
        memory_bank = torch.vstack(self.memory_bank)
        self.memory_bank = []
        self.classifier.fit(memory_bank)
