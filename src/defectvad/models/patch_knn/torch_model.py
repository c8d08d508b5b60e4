# src/defectvad/models/patch_knn/torch_model.py
import torch
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.components.nearest_neighbors import BLOCK_ELEMENTS, squared_distances
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import TrainingError

# a bank image whose every patch lies this close (squared, relative to the patches' squared norm) to the
# query's patches is the query itself; float noise is about 1e-7, two distinct images are far apart
SELF_TOLERANCE = 1e-4


class PatchKnnModel(DynamicBufferMixin):
    # each patch of a frozen backbone is scored by the distance to its nearest patch in the bank images:
    # the k reference images (few-shot, PatchCore without a coreset) or the unlabeled test set itself
    # (zero-shot, MuSc's mutual scoring: exclude_self skips the query's own copy in the bank)
    def __init__(self, backbone="resnet18", layers=None, weights_path=None, exclude_self=False):
        super().__init__()
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (1, 2))
        self.exclude_self = exclude_self
        self.feature_extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        self.feature_pooler = torch.nn.AvgPool2d(3, 1, 1)
        # (bank images, patches per image, channels)
        self.register_buffer("memory_bank", torch.empty(0))
        self.embedding_store = []

    def embed(self, images):
        # (B, C, H, W) -> patch embeddings (B, h * w, C) and the patch grid (h, w), PatchCore's locally pooled layers
        features = self.feature_extractor(images.type(self.memory_bank.dtype))
        embedding = self.feature_pooler(features[self.layers[0]])
        for layer in self.layers[1:]:
            upsampled = F.interpolate(self.feature_pooler(features[layer]), size=embedding.shape[-2:], mode="bilinear")
            embedding = torch.cat((embedding, upsampled), 1)
        return embedding.flatten(2).transpose(1, 2), embedding.shape[-2:]

    @torch.no_grad()
    def collect(self, images):
        self.embedding_store.append(self.embed(images)[0])

    def fit(self):
        if not self.embedding_store:
            raise TrainingError("the patch k-NN model saw no bank images; check the reference or test images")
        self.memory_bank = torch.cat(self.embedding_store)
        self.embedding_store.clear()

    @torch.no_grad()
    def forward(self, images):
        if self.training:
            self.collect(images)
            return None
        if self.memory_bank.shape[0] == 0:
            raise TrainingError("the patch k-NN model's bank is empty: fit or prepare it, or load its weights")
        embedding, (height, width) = self.embed(images)
        patch_scores = self.score_patches(embedding)
        anomaly_map = F.interpolate(patch_scores.reshape(-1, 1, height, width), size=images.shape[-2:],
                                    mode="bilinear", align_corners=False)
        return InferenceBatch(patch_scores.amax(1), anomaly_map)

    def score_patches(self, embedding):
        # (B, P, C) -> (B, P): the distance to the nearest patch of each bank image (taken a few bank images
        # at a time), then the nearest over the bank images, the query's own copy skipped if asked
        batch, patches, channels = embedding.shape
        bank = self.memory_bank.to(embedding.dtype)
        images, bank_patches = bank.shape[:2]
        queries = embedding.reshape(-1, channels)
        step = max(1, BLOCK_ELEMENTS // max(1, queries.shape[0] * bank_patches))
        nearest = []
        for start in range(0, images, step):
            block = bank[start:start + step].reshape(-1, channels)
            distances = squared_distances(queries, block).reshape(batch, patches, -1, bank_patches)
            nearest.append(distances.amin(-1).clamp_min(0))
        nearest = torch.cat(nearest, -1)
        if self.exclude_self:
            scale = embedding.pow(2).sum(-1).mean(-1, keepdim=True)
            itself = nearest.amax(1) <= SELF_TOLERANCE * scale
            nearest = nearest.masked_fill(itself.unsqueeze(1), float("inf"))
        return nearest.amin(-1).sqrt()
