# src/defectvad/models/reverse_distillation/torch_model.py
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import get_backbone, resolve_layers
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.reverse_distillation.anomaly_map import AnomalyMapGenerator
from defectvad.models.reverse_distillation.bottleneck import OCBE
from defectvad.models.reverse_distillation.decoder import DecoderBasicBlock, DecoderBottleneck, ResNetDecoder

# backbone: (bottleneck block, its depth, decoder block, decoder layer depths, decoder width per group);
# the ResNets as anomalib, the EfficientNets with resnet18's layout are our own choice
ARCHITECTURES = {
    "resnet18": (BasicBlock, 2, DecoderBasicBlock, (2, 2, 2), 64),
    "resnet34": (BasicBlock, 2, DecoderBasicBlock, (3, 4, 6), 64),
    "resnet50": (Bottleneck, 3, DecoderBottleneck, (3, 4, 6), 64),
    "wide_resnet50_2": (Bottleneck, 3, DecoderBottleneck, (3, 4, 6), 128),
    "efficientnet_lite0": (BasicBlock, 2, DecoderBasicBlock, (2, 2, 2), 64),
    "efficientnet_b5": (BasicBlock, 2, DecoderBasicBlock, (2, 2, 2), 64),
}


def check_layers(backbone, layers):
    stages = get_backbone(backbone).stages
    positions = [stages.index(layer) if layer in stages else -1 for layer in layers]
    if len(positions) != 3 or -1 in positions or positions != list(range(positions[0], positions[0] + 3)):
        raise ConfigError("Reverse Distillation needs three consecutive stages of the backbone "
                          f"({', '.join(stages)}); got {list(layers)}")


class ReverseDistillationModel(nn.Module):
    def __init__(self, backbone="wide_resnet50_2", layers=None, weights_path=None,
                 anomaly_map_mode="add"):
        super().__init__()
        if backbone not in ARCHITECTURES:
            raise ConfigError(f"Reverse Distillation has no decoder for backbone '{backbone}'; "
                              f"choose one of: {', '.join(ARCHITECTURES)}")
        layers = resolve_layers(backbone, layers, (0, 1, 2))
        check_layers(backbone, layers)
        self.backbone = backbone
        self.layers = layers
        block, blocks, decoder_block, decoder_layers, width = ARCHITECTURES[backbone]
        self.encoder = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        channels = self.encoder.out_dims
        self.bottleneck = OCBE(block, blocks, channels)
        self.decoder = ResNetDecoder(decoder_block, decoder_layers, channels, width_per_group=width)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=4, mode=anomaly_map_mode)

    def forward(self, images):
        encoder_features = list(self.encoder(images).values())
        decoder_features = self.decoder(self.bottleneck(encoder_features))
        if self.training:
            return encoder_features, decoder_features
        anomaly_map = self.anomaly_map_generator(encoder_features, decoder_features, images.shape[-2:])
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)
