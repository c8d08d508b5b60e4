# src/defectvad/models/fastflow/torch_model.py
import torch
from torch import nn

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.components.all_in_one_block import AllInOneBlock
from defectvad.components.sequence_inn import SequenceINN
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.fastflow.anomaly_map import AnomalyMapGenerator


def subnet_conv_func(kernel_size, hidden_ratio):
    def subnet_conv(in_channels, out_channels):
        hidden_channels = int(in_channels * hidden_ratio)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding="same"),
        )

    return subnet_conv


def create_fast_flow_block(input_dimensions, conv3x3_only, hidden_ratio, flow_steps, clamp=2.0):
    nodes = SequenceINN(*input_dimensions)
    for step in range(flow_steps):
        kernel_size = 1 if step % 2 == 1 and not conv3x3_only else 3
        nodes.append(AllInOneBlock, subnet_constructor=subnet_conv_func(kernel_size, hidden_ratio),
                     affine_clamping=clamp, permute_soft=False)
    return nodes


class FastflowModel(nn.Module):
    def __init__(self, input_size=(256, 256), backbone="resnet18", weights_path=None, flow_steps=8,
                 conv3x3_only=False, hidden_ratio=1.0):
        super().__init__()
        self.input_size = tuple(input_size)
        # anomalib reads CNN backbones at their first three stages (timm out_indices 1, 2, 3)
        self.layers = resolve_layers(backbone, None, (0, 1, 2))
        extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path)
        # anomalib holds timm's features_only network itself: its modules sit right under feature_extractor.
        # The wrapper that runs it stays outside the module tree so it adds no state-dict names.
        self.feature_extractor = extractor.feature_extractor
        object.__setattr__(self, "extractor", extractor)

        self.norms = nn.ModuleList()
        self.fast_flow_blocks = nn.ModuleList()
        for layer in self.layers:
            stride = extractor.strides[layer]
            dims = [extractor.channels[layer], int(self.input_size[0] / stride), int(self.input_size[1] / stride)]
            self.norms.append(nn.LayerNorm(dims, elementwise_affine=True))
            self.fast_flow_blocks.append(create_fast_flow_block(dims, conv3x3_only, hidden_ratio, flow_steps))
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=self.input_size)

    def get_cnn_features(self, images):
        features = self.extractor(images)
        expected = tuple(self.norms[0].normalized_shape[-2:])
        if tuple(features[self.layers[0]].shape[-2:]) != expected:
            raise ConfigError(
                f"FastFlow was built for {list(self.input_size)} inputs but got {list(images.shape[-2:])}; "
                "set model.input_size to the transform's output size (a multiple of 32)"
            )
        return [norm(features[layer]) for norm, layer in zip(self.norms, self.layers)]

    def forward(self, images):
        hidden_variables, log_jacobians = [], []
        for block, feature in zip(self.fast_flow_blocks, self.get_cnn_features(images)):
            hidden_variable, log_jacobian = block(feature)
            hidden_variables.append(hidden_variable)
            log_jacobians.append(log_jacobian)
        if self.training:
            return hidden_variables, log_jacobians
        anomaly_map = self.anomaly_map_generator(hidden_variables)
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)
