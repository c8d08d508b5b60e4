# src/defectvad/models/dinomaly/torch_model.py
# Dinomaly (Guo et al. 2025): a frozen DINOv2 encoder; the mean of its middle blocks' tokens goes through a noisy
# MLP bottleneck and a linear-attention decoder that learns to reconstruct them. Anomalies are where the fused
# encoder and decoder features disagree (cosine distance), in a low- and a high-level group of layers
from torch import nn
from torch.nn import functional as F

from defectvad.components.dinov2_reconstruction import Dinov2Reconstruction, fuse_feature, score_top_ratio
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.dinomaly.anomaly_map import calculate_anomaly_maps
from defectvad.models.dinomaly.layers import DecoderViTBlock, DinomalyMLP
from defectvad.models.dinomaly.loss import CosineHardMiningLoss

# the image score is read from the map resized to 256x256
SCORE_MAP_SIZE = 256


class DinomalyModel(Dinov2Reconstruction):
    def __init__(self, backbone="dinov2_vitb14_reg4", weights_path=None, bottleneck_dropout=0.2, decoder_depth=8,
                 target_layers=None, fuse_layer_encoder=None, fuse_layer_decoder=None, remove_class_token=False,
                 use_context_recentering=False):
        super().__init__()
        if use_context_recentering and remove_class_token:
            raise ConfigError("model.use_context_recentering subtracts the class token, so it needs "
                              "model.remove_class_token=false")
        if decoder_depth <= 1:
            raise ConfigError(f"model.decoder_depth must be greater than 1, got {decoder_depth}")
        embed_dim, num_heads = self.build_encoder("Dinomaly", backbone, weights_path, target_layers,
                                                  fuse_layer_encoder, fuse_layer_decoder, decoder_depth,
                                                  remove_class_token)
        self.use_context_recentering = use_context_recentering
        self.bottleneck = nn.ModuleList([DinomalyMLP(embed_dim, embed_dim * 4, embed_dim, drop=bottleneck_dropout,
                                                     bias=False, apply_input_dropout=True)])
        self.decoder = nn.ModuleList([DecoderViTBlock(embed_dim, num_heads) for _ in range(decoder_depth)])
        self.loss_fn = CosineHardMiningLoss()

    def get_encoder_decoder_outputs(self, images):
        # -> fused encoder and decoder feature maps, one (B, C, H / patch, W / patch) pair per fuse group
        grid, encoder_features = self.encode(images)
        if self.use_context_recentering:
            # Dinomaly2's context-aware recentering: patches minus the class token
            encoder_features = [e[:, 1 + self.num_register_tokens:] - e[:, :1] for e in encoder_features]

        x = fuse_feature(encoder_features)
        for block in self.bottleneck:
            x = block(x)
        decoder_features = []
        for block in self.decoder:
            x = block(x)
            decoder_features.append(x)
        strip_prefix = not self.remove_class_token and not self.use_context_recentering
        return self.fuse_groups(encoder_features, decoder_features, grid, strip_prefix)

    def forward(self, images, global_step=None):
        images = images.type(next(self.encoder.parameters()).dtype)
        encoder_maps, decoder_maps = self.get_encoder_decoder_outputs(images)
        if self.training:
            if global_step is None:
                raise TrainingError("Dinomaly's loss needs the training step (global_step)")
            return self.loss_fn(encoder_maps, decoder_maps, global_step)

        anomaly_map, _ = calculate_anomaly_maps(encoder_maps, decoder_maps, images.shape[-2:])
        score_map = F.interpolate(anomaly_map, size=SCORE_MAP_SIZE, mode="bilinear", align_corners=False)
        return InferenceBatch(score_top_ratio(self.gaussian_blur(score_map)), anomaly_map)
