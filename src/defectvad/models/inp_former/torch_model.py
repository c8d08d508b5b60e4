# src/defectvad/models/inp_former/torch_model.py
# INP-Former (Luo et al. 2025): a frozen DINOv2 encoder; learnable queries gather the fused middle-block tokens of
# each image into a few intrinsic normal prototypes (INPs), and a decoder whose attention reads only those
# prototypes reconstructs the tokens from an MLP bottleneck. Anomalies are where the fused encoder and decoder
# features disagree (cosine distance), in a low- and a high-level group of layers
import torch
from torch import nn

from defectvad.components.dinov2_reconstruction import Dinov2Reconstruction, fuse_feature, score_top_ratio
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.dinomaly.anomaly_map import calculate_anomaly_maps
from defectvad.models.dinomaly.layers import DinomalyMLP
from defectvad.models.inp_former.layers import AggregationBlock, PrototypeBlock
from defectvad.models.inp_former.loss import GlobalCosineHmAdaptiveLoss, calculate_inp_loss

DECODER_DEPTH = 8


class InpFormerModel(Dinov2Reconstruction):
    def __init__(self, backbone="dinov2_vitb14_reg4", weights_path=None, inp_num=6, target_layers=None,
                 fuse_layer_encoder=None, fuse_layer_decoder=None, remove_class_token=False):
        super().__init__()
        if inp_num < 1:
            raise ConfigError(f"model.inp_num (the number of prototypes) must be at least 1, got {inp_num}")
        embed_dim, num_heads = self.build_encoder("INP-Former", backbone, weights_path, target_layers,
                                                  fuse_layer_encoder, fuse_layer_decoder, DECODER_DEPTH,
                                                  remove_class_token)
        # the learnable queries of the INP extractor (standard normal, not re-initialised by the trainer)
        self.prototype_token = nn.ParameterList([nn.Parameter(torch.randn(inp_num, embed_dim))])
        self.bottleneck = nn.ModuleList([DinomalyMLP(embed_dim, embed_dim * 4, embed_dim, bias=True)])
        self.aggregation = nn.ModuleList([AggregationBlock(embed_dim, num_heads)])
        self.decoder = nn.ModuleList([PrototypeBlock(embed_dim, num_heads) for _ in range(DECODER_DEPTH)])
        self.loss = GlobalCosineHmAdaptiveLoss()

    def extract_prototypes(self, features):
        # features (B, N, C) -> the image's INPs (B, inp_num, C)
        prototypes = self.prototype_token[0].expand(features.shape[0], -1, -1)
        for block in self.aggregation:
            prototypes = block(prototypes, features)
        return prototypes

    def get_encoder_decoder_inploss(self, images):
        # -> fused encoder and decoder feature maps, one (B, C, H / patch, W / patch) pair per fuse group, and the
        # INP coherence loss (training only; anomalib computes it in evaluation too, a (B, N, inp_num, C) tensor)
        grid, encoder_features = self.encode(images)
        x = fuse_feature(encoder_features)
        prototypes = self.extract_prototypes(x)
        inp_loss = calculate_inp_loss(x, prototypes) if self.training else None
        for block in self.bottleneck:
            x = block(x)
        decoder_features = []
        for block in self.decoder:
            x = block(x, prototypes)
            decoder_features.append(x)
        encoder_maps, decoder_maps = self.fuse_groups(encoder_features, decoder_features, grid,
                                                      strip_prefix=not self.remove_class_token)
        return encoder_maps, decoder_maps, inp_loss

    def forward(self, images):
        images = images.type(self.prototype_token[0].dtype)
        encoder_maps, decoder_maps, inp_loss = self.get_encoder_decoder_inploss(images)
        if self.training:
            return self.loss(encoder_maps, decoder_maps, inp_loss)
        # unlike Dinomaly, the map itself is blurred and scored at the input size
        anomaly_map, _ = calculate_anomaly_maps(encoder_maps, decoder_maps, images.shape[-2:])
        anomaly_map = self.gaussian_blur(anomaly_map)
        return InferenceBatch(score_top_ratio(anomaly_map), anomaly_map)
