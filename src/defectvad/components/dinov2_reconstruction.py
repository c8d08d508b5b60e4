# src/defectvad/components/dinov2_reconstruction.py
# what Dinomaly and INP-Former share: a frozen DINOv2 encoder (anomalib's is timm's network under
# encoder.feature_extractor, with the same parameter names) read at some middle blocks as token sequences
# [class, registers..., patches], a decoder that reconstructs them, the fusion of both into a low- and a high-level
# group of feature maps, and the image score from the blurred anomaly map
import torch
from torch import nn

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import BACKBONES, get_backbone
from defectvad.components.blur import GaussianBlur2d
from defectvad.errors import ConfigError

DINOV2_BACKBONES = [name for name in BACKBONES if name.startswith("dinov2_")]
# anomalib's target blocks: 2..9 of the 12-block ViT-S and ViT-B, every second one from 4 to 18 of the 24-block ViT-L
TARGET_LAYERS = {12: [2, 3, 4, 5, 6, 7, 8, 9], 24: [4, 6, 8, 10, 12, 14, 16, 18]}
# the first four and the last four target layers (and decoder blocks) are fused into two groups
DEFAULT_FUSE_LAYERS = [[0, 1, 2, 3], [4, 5, 6, 7]]
# the image score: the mean of the top 1% pixels of the map blurred with sigma 4, 5x5
BLUR_SIGMA = 4
BLUR_KERNEL_SIZE = 5
SCORE_TOP_RATIO = 0.01


def check_backbone(backbone, model_name):
    if backbone not in DINOV2_BACKBONES:
        raise ConfigError(f"{model_name}'s encoder is a DINOv2 ViT; backbone '{backbone}' is not one. Choose one of: "
                          f"{', '.join(DINOV2_BACKBONES)} (anomalib's: dinov2_vitb14_reg4), e.g. "
                          f"backbone=dinov2_vitb14_reg4")


def check_fuse_layers(groups, count, name):
    if not groups or any(not group or not all(0 <= index < count for index in group) for group in groups):
        raise ConfigError(f"model.{name} must be a list of non-empty groups of indices in 0..{count - 1}, "
                          f"got {groups}")


def fuse_feature(features):
    return torch.stack(features, dim=1).mean(dim=1)


def to_feature_maps(features, grid):
    # patch tokens (B, N, C) -> (B, C, H, W)
    return [f.permute(0, 2, 1).reshape(f.shape[0], -1, *grid).contiguous() for f in features]


def score_top_ratio(score_map):
    # anomalib takes int(1% of the pixels), none on a map under 100 pixels; at least one here
    flat = score_map.flatten(1)
    top = max(int(flat.shape[1] * SCORE_TOP_RATIO), 1)
    return flat.topk(top, dim=1).values.mean(dim=1)


class Dinov2Reconstruction(nn.Module):
    def build_encoder(self, model_name, backbone, weights_path, target_layers, fuse_layer_encoder,
                      fuse_layer_decoder, decoder_depth, remove_class_token):
        # -> the encoder's width and number of heads
        check_backbone(backbone, model_name)
        depth = sum(layer.startswith("blocks.") for layer in get_backbone(backbone).layers)
        self.backbone = backbone
        self.target_layers = list(target_layers if target_layers is not None else TARGET_LAYERS[depth])
        # anomalib's Dinomaly ignores given fuse groups (and then fails); here they are used
        self.fuse_layer_encoder = [list(g) for g in (fuse_layer_encoder or DEFAULT_FUSE_LAYERS)]
        self.fuse_layer_decoder = [list(g) for g in (fuse_layer_decoder or DEFAULT_FUSE_LAYERS)]
        check_fuse_layers(self.fuse_layer_encoder, len(self.target_layers), "fuse_layer_encoder")
        check_fuse_layers(self.fuse_layer_decoder, decoder_depth, "fuse_layer_decoder")
        self.remove_class_token = remove_class_token

        # only the blocks up to the deepest target layer are kept
        self.encoder = FeatureExtractor(backbone, [f"blocks.{i}" for i in self.target_layers],
                                        weights_path=weights_path).eval()
        network = self.encoder.feature_extractor
        # anomalib runs DINOv2 through timm, whose position embeddings it resamples without antialias
        network.pos_embed_rule = "timm_no_antialias"
        self.patch_size = network.patch_size
        self.num_register_tokens = network.num_reg_tokens
        self.gaussian_blur = GaussianBlur2d(sigma=BLUR_SIGMA, channels=1, kernel_size=BLUR_KERNEL_SIZE)
        return network.embed_dim, network.blocks[0].attn.num_heads

    def encode(self, images):
        # -> the patch grid and per target layer the block's tokens (B, 1 + R + N, C), only the patches (B, N, C)
        # when remove_class_token
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        tokens = self.encoder.tokens(images)
        sequences = []
        for index in self.target_layers:
            found = tokens[f"blocks.{index}"]
            prefix = [found["cls"].unsqueeze(1)] + ([found["registers"]] if self.num_register_tokens else [])
            sequences.append(torch.cat(prefix + [found["patches"]], dim=1))
        if self.remove_class_token:
            sequences = [s[:, 1 + self.num_register_tokens:] for s in sequences]
        return grid, sequences

    def fuse_groups(self, encoder_features, decoder_features, grid, strip_prefix):
        # decoder_features in the order of the blocks; the groups count from the deepest. -> per fuse group an
        # encoder and a decoder feature map (B, C, H / patch, W / patch)
        decoder_features = decoder_features[::-1]
        encoder_maps = [fuse_feature([encoder_features[i] for i in group]) for group in self.fuse_layer_encoder]
        decoder_maps = [fuse_feature([decoder_features[i] for i in group]) for group in self.fuse_layer_decoder]
        if strip_prefix:
            encoder_maps = [e[:, 1 + self.num_register_tokens:] for e in encoder_maps]
            decoder_maps = [d[:, 1 + self.num_register_tokens:] for d in decoder_maps]
        return to_feature_maps(encoder_maps, grid), to_feature_maps(decoder_maps, grid)


def convert_anomalib_state_dict(state_dict, model):
    # anomalib's state dict (its Lightning module's keys start with "model.") -> the model's: the names are the
    # same, but anomalib's encoder keeps the blocks after the deepest target layer and the final norm, which it
    # never uses; those are dropped
    state = {key[len("model."):] if key.startswith("model.") else key: value for key, value in state_dict.items()}
    own = model.state_dict()
    return {key: value for key, value in state.items()
            if key in own or not key.startswith("encoder.feature_extractor.")}
