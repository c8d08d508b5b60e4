# src/defectvad/models/anomaly_dino/torch_model.py
import torch
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import get_backbone
from defectvad.backbones.vit import VisionTransformer
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.components.k_center_greedy import KCenterGreedy
from defectvad.components.nearest_neighbors import BLOCK_ELEMENTS
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.patchcore.anomaly_map import AnomalyMapGenerator


def default_layer(backbone):
    # anomalib's features: the last block's patch tokens through the final norm ("norm" on our ViTs);
    # a network without that layer gives its deepest stage
    spec = get_backbone(backbone)
    return "norm" if "norm" in spec.layers else spec.stages[-1]


def dilate(masks, kernel_size):
    # padding counts as background, as OpenCV's default border
    return F.max_pool2d(masks, kernel_size, stride=1, padding=kernel_size // 2)


def erode(masks, kernel_size):
    # padding counts as foreground, as OpenCV's default border
    return -F.max_pool2d(-masks, kernel_size, stride=1, padding=kernel_size // 2)


def first_principal_component(features):
    # (N, D) -> (N,): the centred patches projected on their first principal axis, signed as scikit-learn's
    # PCA (the axis' largest entry positive)
    centred = features - features.mean(0)
    axis = torch.linalg.svd(centred, full_matrices=False)[2][0]
    axis = axis * torch.sign(axis[axis.abs().argmax()])
    return centred @ axis


class AnomalyDINOModel(DynamicBufferMixin):
    # AnomalyDINO: the L2-normalised patch features of a frozen DINOv2 are kept in a memory bank; a test patch
    # scores its cosine distance to the nearest bank patches, an image the mean of its top 1% patch scores
    def __init__(self, backbone="dinov2_vits14", layer=None, weights_path=None, num_neighbours=1, masking=False,
                 coreset_subsampling=False, sampling_ratio=0.1):
        super().__init__()
        if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, int) or num_neighbours < 1:
            raise ConfigError(f"model.num_neighbours must be a positive integer, got {num_neighbours!r}")
        self.backbone = backbone
        self.layer = layer or default_layer(backbone)
        self.num_neighbours = num_neighbours
        self.masking = masking
        self.coreset_subsampling = coreset_subsampling
        self.sampling_ratio = sampling_ratio
        self.feature_encoder = FeatureExtractor(backbone, [self.layer], weights_path=weights_path).eval()
        network = self.feature_encoder.feature_extractor
        if isinstance(network, VisionTransformer):
            # anomalib runs DINOv2 through timm, whose position embeddings it resamples without antialias
            network.pos_embed_rule = "timm_no_antialias"
        self.patch_size = self.feature_encoder.strides[self.layer]
        self.register_buffer("memory_bank", torch.empty(0))
        self.embedding_store = []
        self.anomaly_map_generator = AnomalyMapGenerator()

    def fit(self, features=None, start_index=None, progress_bar=None):
        # features and start_index: a given projection and first centre of the coreset, to compare with anomalib
        if not self.embedding_store:
            raise TrainingError("AnomalyDINO saw no training images; check the training or reference images")
        self.memory_bank = torch.vstack(self.embedding_store)
        self.embedding_store.clear()
        if self.memory_bank.shape[0] == 0:
            raise TrainingError("AnomalyDINO's masking found no foreground patch in the training images; "
                                "set model.masking=false")
        if self.coreset_subsampling:
            sampler = KCenterGreedy(self.memory_bank, self.sampling_ratio, progress_bar=progress_bar)
            self.memory_bank = self.memory_bank[sampler.select_coreset_idxs(features, start_index)]

    def extract_features(self, images):
        # (B, 3, H, W) -> patch features (B, N, D) and their grid (H / patch, W / patch)
        feature_map = self.feature_encoder(images)[self.layer]
        return feature_map.flatten(2).transpose(1, 2), tuple(feature_map.shape[-2:])

    @staticmethod
    def compute_background_masks(batch_features, grid_size, threshold=10.0, kernel_size=3, border=0.2):
        # (B, N, D) -> (B, N), True on foreground: per image, the patches whose first principal component
        # exceeds the threshold (the opposite side when the centre holds 35% of the grid or less), dilated, closed
        height, width = grid_size
        y0, y1 = int(height * border), int(height * (1 - border))
        x0, x1 = int(width * border), int(width * (1 - border))
        masks = []
        for features in batch_features.float():
            first_pc = first_principal_component(features)
            mask = (first_pc > threshold).reshape(height, width)
            centre = mask[y0:y1, x0:x1]
            if centre.sum() <= centre.numel() * 0.35:
                mask = (-first_pc > threshold).reshape(height, width)
            masks.append(mask)
        masks = dilate(torch.stack(masks).unsqueeze(1).float(), kernel_size)
        masks = erode(dilate(masks, kernel_size), kernel_size)
        return masks.flatten(1) > 0.5

    @staticmethod
    def mean_top1p(distances):
        count = max(int(distances.shape[-1] * 0.01), 1)
        return distances.topk(count, dim=1).values.mean(1)

    def nearest_distances(self, features):
        # (Q, D) -> (Q,): mean cosine distance to the num_neighbours nearest bank patches (features and bank are
        # unit vectors), a block of queries at a time
        bank = self.memory_bank
        if self.num_neighbours > bank.shape[0]:
            raise ConfigError(f"model.num_neighbours is {self.num_neighbours} but the memory bank holds "
                              f"{bank.shape[0]} patches; lower it")
        # ONNX export: one block, since a traced loop would keep the trace's batch size
        step = features.shape[0] if torch.jit.is_tracing() else max(1, BLOCK_ELEMENTS // bank.shape[0])
        nearest = []
        for start in range(0, features.shape[0], step):
            similarity = features[start:start + step] @ bank.T
            distances = (torch.ones_like(similarity) - similarity).clamp(0.0, 2.0)
            nearest.append(distances.topk(self.num_neighbours, dim=1, largest=False).values.mean(1))
        return torch.cat(nearest)

    @torch.no_grad()
    def forward(self, images):
        images = images.type(self.memory_bank.dtype)
        batch, _, height, width = images.shape
        # a centred crop to whole patches; the map is padded back to the input size by repeating its edges
        crop_h, crop_w = height % self.patch_size, width % self.patch_size
        top, left = crop_h // 2, crop_w // 2
        images = images[:, :, top:top + height - crop_h, left:left + width - crop_w]
        features, grid_size = self.extract_features(images)
        if self.masking:
            masks = self.compute_background_masks(features, grid_size)
        else:
            masks = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        features = F.normalize(features, p=2, dim=-1)

        if self.training:
            self.embedding_store.append(features[masks])
            return None
        if self.memory_bank.shape[0] == 0:
            raise TrainingError("AnomalyDINO's memory bank is empty: fit the model or load its weights before predicting")
        distances = self.nearest_distances(features.reshape(-1, features.shape[-1]).to(self.memory_bank.dtype))
        # background patches (masking) score 0
        distances = distances.reshape(batch, -1) * masks
        pred_score = self.mean_top1p(distances)
        anomaly_map = self.anomaly_map_generator(distances.reshape(batch, 1, *grid_size),
                                                 (height - crop_h, width - crop_w))
        anomaly_map = F.pad(anomaly_map, (left, crop_w - left, top, crop_h - top), mode="replicate")
        return InferenceBatch(pred_score, anomaly_map)
