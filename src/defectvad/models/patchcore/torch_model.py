# src/defectvad/models/patchcore/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.components.k_center_greedy import KCenterGreedy
from defectvad.components.memory_banks import stack_and_clear
from defectvad.components.nearest_neighbors import euclidean_dist, nearest_neighbors, squared_norms
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.patchcore.anomaly_map import AnomalyMapGenerator


class PatchcoreModel(DynamicBufferMixin):
    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None, num_neighbors=9):
        super().__init__()
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
            raise ConfigError(f"model.num_neighbors must be a positive integer, got {num_neighbors!r}")
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (1, 2))
        self.num_neighbors = num_neighbors
        self.feature_extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        self.feature_pooler = nn.AvgPool2d(3, 1, 1)
        self.anomaly_map_generator = AnomalyMapGenerator()
        self.register_buffer("memory_bank", torch.empty(0))
        self.embedding_store = []

    @torch.no_grad()
    def forward(self, images):
        images = images.type(self.memory_bank.dtype)
        features = self.feature_extractor(images)
        features = {layer: self.feature_pooler(feature) for layer, feature in features.items()}
        embedding = self.generate_embedding(features)
        batch, _, height, width = embedding.shape
        embedding = self.reshape_embedding(embedding)
        if self.training:
            self.embedding_store.append(embedding)
            return embedding
        if self.memory_bank.shape[0] == 0:
            raise TrainingError("PatchCore's memory bank is empty: fit the model or load its weights before predicting")
        bank_sq = squared_norms(self.memory_bank)
        patch_scores, locations = nearest_neighbors(embedding, self.memory_bank, 1, bank_sq)
        patch_scores = patch_scores.reshape(batch, -1)
        locations = locations.reshape(batch, -1)
        pred_score = self.compute_anomaly_score(patch_scores, locations, embedding, bank_sq)
        anomaly_map = self.anomaly_map_generator(patch_scores.reshape(batch, 1, height, width), images.shape[-2:])
        return InferenceBatch(pred_score, anomaly_map)

    def generate_embedding(self, features):
        embeddings = features[self.layers[0]]
        for layer in self.layers[1:]:
            upsampled = F.interpolate(features[layer], size=embeddings.shape[-2:], mode="bilinear")
            embeddings = torch.cat((embeddings, upsampled), 1)
        return embeddings

    @staticmethod
    def reshape_embedding(embedding):
        # (B, C, H, W) -> (B * H * W, C), one row per patch
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def subsample_embedding(self, sampling_ratio, features=None, start_index=None, progress_bar=None):
        # features and start_index: a given projection and first centre, to compare with anomalib
        if not self.embedding_store:
            raise TrainingError("PatchCore saw no training images; check the training set")
        embedding = stack_and_clear(self.embedding_store)
        sampler = KCenterGreedy(embedding, sampling_ratio, progress_bar=progress_bar)
        self.memory_bank = embedding[sampler.select_coreset_idxs(features, start_index)]

    def compute_anomaly_score(self, patch_scores, locations, embedding, bank_sq=None):
        # the paper's re-weighting: the farthest patch's score, lowered when its nearest bank entry
        # sits in a dense part of the bank (anomalib 2.x's formula)
        if self.num_neighbors == 1:
            return patch_scores.amax(1)
        batch, num_patches = patch_scores.shape
        rows = torch.arange(batch, device=patch_scores.device)
        max_patches = torch.argmax(patch_scores, dim=1)
        max_features = embedding.reshape(batch, num_patches, -1)[rows, max_patches]
        score = patch_scores[rows, max_patches]
        nn_sample = self.memory_bank[locations[rows, max_patches]]
        count = min(self.num_neighbors, self.memory_bank.shape[0])
        _, support = nearest_neighbors(nn_sample, self.memory_bank, count, bank_sq)
        distances = euclidean_dist(max_features.unsqueeze(1).float(), self.memory_bank[support].float())
        weights = 1 - F.softmax(distances.squeeze(1), 1)[..., 0]
        return weights * score
