# src/defectvad/models/cfa/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.components.kmeans import KMeans
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import TrainingError
from defectvad.models.cfa.anomaly_map import AnomalyMapGenerator

# elements of the (images x patches x centres) distance block scored at once in evaluation (512 MB)
EVAL_BLOCK_ELEMENTS = 2**27


class CfaModel(DynamicBufferMixin):
    def __init__(self, backbone="wide_resnet50_2", weights_path=None, gamma_c=1, gamma_d=1,
                 num_nearest_neighbors=3, num_hard_negative_features=3):
        super().__init__()
        self.backbone = backbone
        self.gamma_c = gamma_c
        self.gamma_d = gamma_d
        self.num_nearest_neighbors = num_nearest_neighbors
        self.num_hard_negative_features = num_hard_negative_features
        # (descriptor channels, patches) once fitted; a scalar until then
        self.register_buffer("memory_bank", torch.tensor(0.0))
        # the backbone's first three stages (layer1..layer3 on ResNets), as anomalib
        extractor = FeatureExtractor(backbone, resolve_layers(backbone, None, (0, 1, 2)), weights_path=weights_path)
        # anomalib holds torchvision's feature graph itself: its modules sit right under feature_extractor.
        # The wrapper that runs it stays outside the module tree so it adds no state-dict names.
        self.feature_extractor = extractor.feature_extractor
        object.__setattr__(self, "extractor", extractor)
        self.descriptor = Descriptor(gamma_d, sum(extractor.out_dims))
        self.anomaly_map_generator = AnomalyMapGenerator(num_nearest_neighbors=num_nearest_neighbors)

    def get_features(self, images):
        return list(self.extractor(images).values())

    @torch.no_grad()
    def initialize_centroid(self, data_loader):
        # the memory bank: the mean descriptor map of the training set, one centre per patch position
        device = self.memory_bank.device
        memory_bank = torch.tensor(0.0, device=device)
        for count, batch in enumerate(data_loader):
            target_features = self.descriptor(self.get_features(batch["image"].to(device)))
            # a running mean over batches (each batch weighs the same, as in anomalib)
            memory_bank = (memory_bank * count + target_features.mean(dim=0, keepdim=True)) / (count + 1)
        if memory_bank.ndim == 0:
            raise TrainingError("CFA saw no training images; check the training set")
        channels, height, width = memory_bank.shape[1:]
        memory_bank = memory_bank.permute(0, 2, 3, 1).reshape(height * width, channels)
        if self.gamma_c > 1:
            _, memory_bank = KMeans(n_clusters=(height * width) // self.gamma_c, max_iter=3000).fit(memory_bank)
        self.memory_bank = memory_bank.T

    def compute_distance(self, target_oriented_features):
        if target_oriented_features.ndim == 4:
            batch, channels = target_oriented_features.shape[:2]
            target_oriented_features = target_oriented_features.reshape(batch, channels, -1).transpose(1, 2)
        # squared distances (batch, patches, centres) by the norm expansion, as anomalib
        features = target_oriented_features.pow(2).sum(dim=2, keepdim=True)
        memory_bank = self.memory_bank.to(features.device)
        centers = memory_bank.pow(2).sum(dim=0, keepdim=True)
        # (batch, patches, centres) is the big tensor: two of them at a time, not four; same rounding
        f_c = torch.matmul(target_oriented_features, memory_bank).mul_(2)
        return (features + centers).sub_(f_c)

    def forward(self, images):
        if self.memory_bank.ndim == 0:
            raise TrainingError("CFA's memory bank is empty; fit the model (initialize_centroid) first")
        target_features = self.descriptor(self.get_features(images))
        if self.training:
            return self.compute_distance(target_features)
        # the distances are reduced to scores a few images at a time, so no batch-sized
        # (patches x centres) block is held; each image's score is the same as in one pass
        scale = target_features.shape[-2:]
        step = max(1, EVAL_BLOCK_ELEMENTS // (scale[0] * scale[1] * self.memory_bank.shape[1]))
        score = torch.cat([self.anomaly_map_generator.compute_score(self.compute_distance(chunk), scale)
                           for chunk in target_features.split(step)])
        anomaly_map = self.anomaly_map_generator.compute_anomaly_map(score, image_size=images.shape[-2:])
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)


class Descriptor(nn.Module):
    # the patch descriptor: 3x3 average of each layer, upsampled to the first layer's size, concatenated,
    # then a 1x1 CoordConv to channels // gamma_d
    def __init__(self, gamma_d, channels):
        super().__init__()
        self.layer = CoordConv2d(in_channels=channels, out_channels=channels // gamma_d, kernel_size=1)

    def forward(self, features):
        if isinstance(features, dict):
            features = list(features.values())
        patch_features = None
        for feature in features:
            pooled = F.avg_pool2d(feature, 3, 1, 1)
            if patch_features is None:
                patch_features = pooled
            else:
                upsampled = F.interpolate(pooled, patch_features.size(2), mode="bilinear")
                patch_features = torch.cat((patch_features, upsampled), dim=1)
        return self.layer(patch_features)


class CoordConv2d(nn.Conv2d):
    # anomalib's CoordConv is an nn.Conv2d whose own weight goes unused; the inner conv2d sees the
    # input with two coordinate channels. Both are kept so that state dicts match.
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, with_r=False):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                         stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.add_coords = AddCoords(with_r)
        self.conv2d = nn.Conv2d(in_channels=in_channels + 2 + int(with_r), out_channels=out_channels,
                                kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, bias=bias)

    def forward(self, input_tensor):
        return self.conv2d(self.add_coords(input_tensor))


class AddCoords(nn.Module):
    def __init__(self, with_r=False):
        super().__init__()
        self.with_r = with_r

    def forward(self, input_tensor):
        batch, _, height, width = input_tensor.shape
        device = input_tensor.device
        # row and column indices scaled to [-1, 1]
        rows = torch.arange(height, device=device, dtype=torch.float32) / (height - 1) * 2 - 1
        columns = torch.arange(width, device=device, dtype=torch.float32) / (width - 1) * 2 - 1
        xx_channel = rows.reshape(1, 1, height, 1).expand(batch, 1, height, width)
        yy_channel = columns.reshape(1, 1, 1, width).expand(batch, 1, height, width)
        out = torch.cat([input_tensor, xx_channel.to(input_tensor.dtype), yy_channel.to(input_tensor.dtype)], dim=1)
        if self.with_r:
            rr_channel = torch.sqrt(torch.pow(xx_channel - 0.5, 2) + torch.pow(yy_channel - 0.5, 2))
            out = torch.cat([out, rr_channel.to(input_tensor.dtype)], dim=1)
        return out
