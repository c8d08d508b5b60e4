# src/defectvad/models/dinomaly/torch_model.py
# Dinomaly (Guo et al. 2025): a frozen DINOv2 encoder; the mean of its middle blocks' tokens goes through a noisy
# MLP bottleneck and a linear-attention decoder that learns to reconstruct them. Anomalies are where the fused
# encoder and decoder features disagree (cosine distance), in a low- and a high-level group of layers
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import BACKBONES, get_backbone
from defectvad.components.blur import GaussianBlur2d
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.dinomaly.anomaly_map import calculate_anomaly_maps
from defectvad.models.dinomaly.layers import DecoderViTBlock, DinomalyMLP
from defectvad.models.dinomaly.loss import CosineHardMiningLoss

DINOV2_BACKBONES = [name for name in BACKBONES if name.startswith("dinov2_")]
# anomalib's target blocks: 2..9 of the 12-block ViT-S and ViT-B, every second one from 4 to 18 of the 24-block ViT-L
TARGET_LAYERS = {12: [2, 3, 4, 5, 6, 7, 8, 9], 24: [4, 6, 8, 10, 12, 14, 16, 18]}
# the first four and the last four target layers (and decoder blocks) are fused into two groups
DEFAULT_FUSE_LAYERS = [[0, 1, 2, 3], [4, 5, 6, 7]]
# the image score: the map resized to 256x256, blurred (sigma 4, 5x5), the mean of its top 1% pixels
SCORE_MAP_SIZE = 256
SCORE_TOP_RATIO = 0.01
BLUR_SIGMA = 4
BLUR_KERNEL_SIZE = 5


def check_backbone(backbone):
    if backbone not in DINOV2_BACKBONES:
        raise ConfigError(f"Dinomaly's encoder is a DINOv2 ViT; backbone '{backbone}' is not one. Choose one of: "
                          f"{', '.join(DINOV2_BACKBONES)} (anomalib's: dinov2_vitb14_reg4), e.g. "
                          f"backbone=dinov2_vitb14_reg4")


def check_fuse_layers(groups, count, name):
    if not groups or any(not group or not all(0 <= index < count for index in group) for group in groups):
        raise ConfigError(f"model.{name} must be a list of non-empty groups of indices in 0..{count - 1}, "
                          f"got {groups}")


class DinomalyModel(nn.Module):
    def __init__(self, backbone="dinov2_vitb14_reg4", weights_path=None, bottleneck_dropout=0.2, decoder_depth=8,
                 target_layers=None, fuse_layer_encoder=None, fuse_layer_decoder=None, remove_class_token=False,
                 use_context_recentering=False):
        super().__init__()
        check_backbone(backbone)
        if use_context_recentering and remove_class_token:
            raise ConfigError("model.use_context_recentering subtracts the class token, so it needs "
                              "model.remove_class_token=false")
        if decoder_depth <= 1:
            raise ConfigError(f"model.decoder_depth must be greater than 1, got {decoder_depth}")
        depth = sum(layer.startswith("blocks.") for layer in get_backbone(backbone).layers)
        self.backbone = backbone
        self.target_layers = list(target_layers if target_layers is not None else TARGET_LAYERS[depth])
        # anomalib ignores given fuse groups (and then fails); here they are used
        self.fuse_layer_encoder = [list(g) for g in (fuse_layer_encoder or DEFAULT_FUSE_LAYERS)]
        self.fuse_layer_decoder = [list(g) for g in (fuse_layer_decoder or DEFAULT_FUSE_LAYERS)]
        check_fuse_layers(self.fuse_layer_encoder, len(self.target_layers), "fuse_layer_encoder")
        check_fuse_layers(self.fuse_layer_decoder, decoder_depth, "fuse_layer_decoder")
        self.remove_class_token = remove_class_token
        self.use_context_recentering = use_context_recentering

        # anomalib's encoder is timm's network under encoder.feature_extractor, with the same parameter names;
        # only the blocks up to the deepest target layer are kept here
        self.encoder = FeatureExtractor(backbone, [f"blocks.{i}" for i in self.target_layers],
                                        weights_path=weights_path).eval()
        network = self.encoder.feature_extractor
        # anomalib runs DINOv2 through timm, whose position embeddings it resamples without antialias
        network.pos_embed_rule = "timm_no_antialias"
        self.patch_size = network.patch_size
        self.num_register_tokens = network.num_reg_tokens
        embed_dim, num_heads = network.embed_dim, network.blocks[0].attn.num_heads

        self.bottleneck = nn.ModuleList([DinomalyMLP(embed_dim, embed_dim * 4, embed_dim, drop=bottleneck_dropout,
                                                     bias=False, apply_input_dropout=True)])
        self.decoder = nn.ModuleList([DecoderViTBlock(embed_dim, num_heads) for _ in range(decoder_depth)])
        self.gaussian_blur = GaussianBlur2d(sigma=BLUR_SIGMA, channels=1, kernel_size=BLUR_KERNEL_SIZE)
        self.loss_fn = CosineHardMiningLoss()

    def encode(self, images):
        # per target layer the block's whole token sequence [class, registers..., patches] (B, 1 + R + N, C)
        tokens = self.encoder.tokens(images)
        sequences = []
        for index in self.target_layers:
            found = tokens[f"blocks.{index}"]
            prefix = [found["cls"].unsqueeze(1)] + ([found["registers"]] if self.num_register_tokens else [])
            sequences.append(torch.cat(prefix + [found["patches"]], dim=1))
        return sequences

    @staticmethod
    def fuse_feature(features):
        return torch.stack(features, dim=1).mean(dim=1)

    def get_encoder_decoder_outputs(self, images):
        # -> fused encoder and decoder feature maps, one (B, C, H / patch, W / patch) pair per fuse group
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        prefix = 1 + self.num_register_tokens
        encoder_features = self.encode(images)
        if self.remove_class_token:
            encoder_features = [e[:, prefix:] for e in encoder_features]
        elif self.use_context_recentering:
            # Dinomaly2's context-aware recentering: patches minus the class token
            encoder_features = [e[:, prefix:] - e[:, :1] for e in encoder_features]

        x = self.fuse_feature(encoder_features)
        for block in self.bottleneck:
            x = block(x)
        decoder_features = []
        for block in self.decoder:
            x = block(x)
            decoder_features.append(x)
        decoder_features = decoder_features[::-1]

        encoder_maps = [self.fuse_feature([encoder_features[i] for i in group]) for group in self.fuse_layer_encoder]
        decoder_maps = [self.fuse_feature([decoder_features[i] for i in group]) for group in self.fuse_layer_decoder]
        return self.to_feature_maps(encoder_maps, grid), self.to_feature_maps(decoder_maps, grid)

    def to_feature_maps(self, features, grid):
        # the prefix tokens dropped (when still there), patches (B, N, C) -> (B, C, H, W)
        if not self.remove_class_token and not self.use_context_recentering:
            features = [f[:, 1 + self.num_register_tokens:] for f in features]
        return [f.permute(0, 2, 1).reshape(f.shape[0], -1, *grid).contiguous() for f in features]

    def forward(self, images, global_step=None):
        images = images.type(next(self.encoder.parameters()).dtype)
        encoder_maps, decoder_maps = self.get_encoder_decoder_outputs(images)
        if self.training:
            if global_step is None:
                raise TrainingError("Dinomaly's loss needs the training step (global_step)")
            return self.loss_fn(encoder_maps, decoder_maps, global_step)

        anomaly_map, _ = calculate_anomaly_maps(encoder_maps, decoder_maps, images.shape[-2:])
        score_map = F.interpolate(anomaly_map, size=SCORE_MAP_SIZE, mode="bilinear", align_corners=False)
        score_map = self.gaussian_blur(score_map).flatten(1)
        top = max(int(score_map.shape[1] * SCORE_TOP_RATIO), 1)
        pred_score = score_map.topk(top, dim=1).values.mean(dim=1)
        return InferenceBatch(pred_score, anomaly_map)


def convert_anomalib_state_dict(state_dict, model):
    # anomalib's Dinomaly state dict (its Lightning module's keys start with "model.") -> this model's: the names
    # are the same, but anomalib's encoder keeps the blocks after the deepest target layer and the final norm,
    # which it never uses; those are dropped
    state = {key[len("model."):] if key.startswith("model.") else key: value for key, value in state_dict.items()}
    own = model.state_dict()
    return {key: value for key, value in state.items()
            if key in own or not key.startswith("encoder.feature_extractor.")}
