# src/defectvad/models/fastflow/torch_model.py
import torch
from torch import nn

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.backbones.vit import run_blocks, to_feature_map
from defectvad.components.all_in_one_block import AllInOneBlock
from defectvad.components.sequence_inn import SequenceINN
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.fastflow.anomaly_map import AnomalyMapGenerator

# anomalib's two transformers and the block whose tokens it reads (the FastFlow paper's Table 6: DeiT block
# index 7, CaiT 40)
TRANSFORMER_BLOCKS = {"deit_base_distilled_patch16_384": "blocks.7", "cait_m48_448": "blocks.40"}


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
        self.transformer = backbone in TRANSFORMER_BLOCKS
        if self.transformer:
            self.layers = [TRANSFORMER_BLOCKS[backbone]]
            # "norm" keeps the final LayerNorm, which anomalib applies to the block's tokens; the blocks
            # after the read one stay in the state dict (anomalib holds the whole timm model) but never run
            extractor = FeatureExtractor(backbone, self.layers + ["norm"], weights_path=weights_path)
        else:
            # anomalib reads CNN backbones at their first three stages (timm out_indices 1, 2, 3)
            self.layers = resolve_layers(backbone, None, (0, 1, 2))
            extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path)
        # anomalib holds the timm network itself: its modules sit right under feature_extractor.
        # The wrapper that runs it stays outside the module tree so it adds no state-dict names.
        self.feature_extractor = extractor.feature_extractor
        object.__setattr__(self, "extractor", extractor)

        # the transformers' tokens are already normalised: anomalib gives them no trainable LayerNorm
        self.norms = None if self.transformer else nn.ModuleList()
        self.fast_flow_blocks = nn.ModuleList()
        self.flow_grids = []
        for layer in self.layers:
            stride = extractor.strides[layer]
            dims = [extractor.channels[layer], int(self.input_size[0] / stride), int(self.input_size[1] / stride)]
            self.flow_grids.append(tuple(dims[1:]))
            if not self.transformer:
                self.norms.append(nn.LayerNorm(dims, elementwise_affine=True))
            self.fast_flow_blocks.append(create_fast_flow_block(dims, conv3x3_only, hidden_ratio, flow_steps))
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=self.input_size)

    def check_size(self, images, grid):
        if tuple(grid) != self.flow_grids[0]:
            multiple = 16 if self.transformer else 32
            raise ConfigError(
                f"FastFlow was built for {list(self.input_size)} inputs but got {list(images.shape[-2:])}; "
                f"set model.input_size to the transform's output size (a multiple of {multiple})"
            )

    def get_cnn_features(self, images):
        features = self.extractor(images)
        self.check_size(images, features[self.layers[0]].shape[-2:])
        return [norm(features[layer]) for norm, layer in zip(self.norms, self.layers)]

    def get_transformer_features(self, images):
        # the read block's tokens through the final LayerNorm, without the class and distillation tokens,
        # as a (B, C, H / 16, W / 16) map
        network = self.feature_extractor
        network.eval()
        with torch.no_grad():
            outputs, grid = run_blocks(network, images, self.layers)
            self.check_size(images, grid)
            patches = network.norm(outputs[self.layers[0]])[:, network.num_prefix_tokens:]
        return [to_feature_map(patches, grid)]

    def forward(self, images):
        features = self.get_transformer_features(images) if self.transformer else self.get_cnn_features(images)
        hidden_variables, log_jacobians = [], []
        for block, feature in zip(self.fast_flow_blocks, features):
            hidden_variable, log_jacobian = block(feature)
            hidden_variables.append(hidden_variable)
            log_jacobians.append(log_jacobian)
        if self.training:
            return hidden_variables, log_jacobians
        anomaly_map = self.anomaly_map_generator(hidden_variables)
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)
