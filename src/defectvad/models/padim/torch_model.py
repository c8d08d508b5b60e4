# src/defectvad/models/padim/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.memory_banks import stack_and_clear
from defectvad.components.multi_variate_gaussian import MultiVariateGaussian
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.padim.anomaly_map import AnomalyMapGenerator

# the paper's reduced dimensions (anomalib's defaults for resnet18 and wide_resnet50_2)
N_FEATURES_DEFAULTS = {"resnet18": 100, "wide_resnet50_2": 550}
# other backbones: the paper's count for the same embedding width (resnet18's 448, wide_resnet50_2's 1792),
# else every channel up to 550 (our choice)
N_FEATURES_BY_WIDTH = {448: 100, 1792: 550}


def default_n_features(backbone, width):
    return N_FEATURES_DEFAULTS.get(backbone) or N_FEATURES_BY_WIDTH.get(width) or min(width, 550)


class PadimModel(nn.Module):
    def __init__(self, backbone="resnet18", layers=None, weights_path=None, n_features=None):
        super().__init__()
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (0, 1, 2))
        self.feature_extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        self.n_features_original = sum(self.feature_extractor.out_dims)
        self.n_features = n_features or default_n_features(backbone, self.n_features_original)
        if not 0 < self.n_features <= self.n_features_original:
            raise ConfigError(f"model.n_features must be in 1..{self.n_features_original} for backbone {backbone}, got {self.n_features}")
        self.register_buffer("idx", torch.randperm(self.n_features_original)[: self.n_features])
        self.anomaly_map_generator = AnomalyMapGenerator()
        self.gaussian = MultiVariateGaussian()
        self.memory_bank = []

    def forward(self, images):
        with torch.no_grad():
            embeddings = self.generate_embedding(self.feature_extractor(images))
        if self.training:
            self.memory_bank.append(embeddings)
            return embeddings
        anomaly_map = self.anomaly_map_generator(
            embeddings, self.gaussian.mean, self.gaussian.inv_covariance, image_size=images.shape[-2:]
        )
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)

    def generate_embedding(self, features):
        # the kept channels (idx of the layers' concatenation) only: nearest upsampling copies values, so
        # selecting them before upsampling gives the same embedding without the full concatenation
        first = features[self.layers[0]]
        idx = self.idx.to(first.device)
        embeddings = first.new_empty((first.shape[0], len(idx), *first.shape[-2:]))
        start = 0
        for layer in self.layers:
            feature = features[layer]
            end = start + feature.shape[1]
            kept = torch.nonzero((idx >= start) & (idx < end)).flatten()
            if len(kept):
                selected = torch.index_select(feature, 1, idx[kept] - start)
                if selected.shape[-2:] != embeddings.shape[-2:]:
                    selected = F.interpolate(selected, size=embeddings.shape[-2:], mode="nearest")
                embeddings[:, kept] = selected
            start = end
        return embeddings

    def fit(self):
        if not self.memory_bank:
            raise ConfigError("PaDiM saw no training images; check the training set")
        self.gaussian.fit(stack_and_clear(self.memory_bank))
