# src/defectvad/models/supersimplenet/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.models.supersimplenet.anomaly_generator import AnomalyGenerator
from defectvad.models.supersimplenet.anomaly_map import AnomalyMapGenerator


def init_weights(module):
    # Xavier-normal weights for the linear and 1x1/5x5 convolutions (biases keep PyTorch's), BatchNorm scale 1
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.constant_(module.weight, 1)


class UpscalingFeatureExtractor(nn.Module):
    # frozen backbone layers, all resized to twice the first layer's size, concatenated and 3x3 average-pooled
    def __init__(self, backbone, layers, weights_path=None, patch_size=3):
        super().__init__()
        self.feature_extractor = FeatureExtractor(backbone, layers, weights_path=weights_path).eval()
        self.pooler = nn.AvgPool2d(kernel_size=patch_size, stride=1, padding=patch_size // 2)

    def forward(self, images):
        features = list(self.feature_extractor(images).values())
        height, width = features[0].shape[-2:]
        resized = [F.interpolate(feature, size=(2 * height, 2 * width), mode="bilinear") for feature in features]
        return self.pooler(torch.cat(resized, dim=1))

    def get_channels_dim(self):
        return sum(self.feature_extractor.out_dims)


class FeatureAdapter(nn.Module):
    # a linear map of every feature vector (1x1 convolution)
    def __init__(self, channel_dim):
        super().__init__()
        self.projection = nn.Conv2d(channel_dim, channel_dim, kernel_size=1, stride=1)
        self.apply(init_weights)

    def forward(self, features):
        return self.projection(features)


class SegmentationDetectionModule(nn.Module):
    # the segmentation head gives a logit map; the classification head reads its features with that map and
    # the map's max and mean, and gives an image logit. stop_grad: no gradient from the score into the map
    def __init__(self, channel_dim, stop_grad=False):
        super().__init__()
        self.stop_grad = stop_grad
        self.seg_head = nn.Sequential(
            nn.Conv2d(channel_dim, 1024, kernel_size=1, stride=1),
            nn.BatchNorm2d(1024),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(1024, 1, kernel_size=1, stride=1, bias=False),
        )
        self.map_avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.map_max_pool = nn.AdaptiveMaxPool2d((1, 1))
        self.dec_avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dec_max_pool = nn.AdaptiveMaxPool2d((1, 1))
        self.cls_conv = nn.Sequential(
            nn.Conv2d(channel_dim + 1, 128, kernel_size=5, padding="same"),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        # max and mean of the 128 convolution channels, max and mean of the map
        self.cls_fc = nn.Linear(128 * 2 + 2, 1)
        self.apply(init_weights)

    def forward(self, seg_features, cls_features):
        ano_map = self.seg_head(seg_features)
        map_input = ano_map.detach() if self.stop_grad else ano_map
        dec_out = self.cls_conv(torch.cat((cls_features, map_input), dim=1))
        map_max, map_avg = self.map_max_pool(ano_map), self.map_avg_pool(ano_map)
        if self.stop_grad:
            map_max, map_avg = map_max.detach(), map_avg.detach()
        pooled = torch.cat((self.dec_max_pool(dec_out), self.dec_avg_pool(dec_out), map_max, map_avg), dim=1)
        ano_score = self.cls_fc(pooled.reshape(pooled.shape[0], -1)).squeeze(dim=1)
        return ano_map, ano_score


class SupersimplenetModel(nn.Module):
    # adapt_cls_features: the classification head reads adapted features (ICPR 2024) instead of the
    # backbone's own (JIMS 2025, anomalib's default)
    def __init__(self, perlin_threshold=0.2, backbone="wide_resnet50_2", layers=None, stop_grad=True,
                 adapt_cls_features=False, weights_path=None, noise_mean=0.0, noise_std=0.015):
        super().__init__()
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (1, 2))
        self.feature_extractor = UpscalingFeatureExtractor(backbone, self.layers, weights_path=weights_path)
        channels = self.feature_extractor.get_channels_dim()
        self.adapt_cls_features = adapt_cls_features
        self.adaptor = FeatureAdapter(channels)
        self.segdec = SegmentationDetectionModule(channel_dim=channels, stop_grad=stop_grad)
        self.anomaly_generator = AnomalyGenerator(noise_mean=noise_mean, noise_std=noise_std,
                                                  threshold=perlin_threshold)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=4)

    def forward(self, images, masks=None, labels=None):
        features = self.feature_extractor(images)
        adapted = self.adaptor(features)
        if not self.training:
            cls_features = adapted if self.adapt_cls_features else features
            anomaly_map, anomaly_score = self.segdec(seg_features=adapted, cls_features=cls_features)
            anomaly_map = self.anomaly_map_generator(anomaly_map, final_size=images.shape[-2:])
            return InferenceBatch(anomaly_score.sigmoid(), anomaly_map.sigmoid())

        batch, _, height, width = features.shape
        labels = torch.zeros(batch, device=features.device) if labels is None else labels.float()
        if masks is None:
            if labels.any():
                raise RuntimeError("training with anomalous images needs their masks")
            masks = torch.zeros(batch, 1, height, width, device=features.device)
        else:
            masks = self.downsample_mask(masks, height, width)
        noised_features, noised_adapted, masks, labels = self.anomaly_generator(
            input_features=None if self.adapt_cls_features else features,
            adapted_features=adapted, masks=masks, labels=labels,
        )
        cls_features = noised_adapted if self.adapt_cls_features else noised_features
        anomaly_map, anomaly_score = self.segdec(seg_features=noised_adapted, cls_features=cls_features)
        return anomaly_map, anomaly_score, masks, labels

    @staticmethod
    def downsample_mask(masks, height, width):
        # (B, H, W) or (B, 1, H, W) masks to the feature grid: bilinear, then binarised at 0.5
        masks = masks.float().reshape(masks.shape[0], 1, *masks.shape[-2:])
        masks = F.interpolate(masks, size=(height, width), mode="bilinear")
        return (masks >= 0.5).float()
