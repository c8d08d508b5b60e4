# src/defectvad/models/musc/backbones.py
# The two backbone families MuSc runs on, as the authors read them: CLIP's image tower (the raw residual stream
# after each chosen block; the class token through ln_post and proj, L2-normalised) and DINOv2 (each chosen
# block's tokens through the final norm, as get_intermediate_layers; the final-norm class token as it is)
import math

import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.clip import CLIP_ARCHITECTURES, QuickGELU, VisionTransformer
from defectvad.backbones.registry import BACKBONES, find_entry, get_backbone
from defectvad.backbones.weights import load_state_dict
from defectvad.errors import BackboneError, ConfigError


def musc_backbones():
    return [name for name, spec in BACKBONES.items() if spec.family == "clip" or name.startswith("dinov2")]


def build_clip_tower(backbone, architecture, quick_gelu):
    # only the image tower; architecture: sizes that replace the backbone's (random weights, tests)
    sizes = {**CLIP_ARCHITECTURES[backbone], **architecture}
    if quick_gelu is not None:
        sizes["quick_gelu"] = quick_gelu
    act_layer = QuickGELU if sizes["quick_gelu"] else nn.GELU
    width = sizes["vision_width"]
    return VisionTransformer(sizes["image_size"], sizes["patch_size"], width, sizes["vision_layers"],
                             width // sizes.get("vision_head_width", 64), sizes["embed_dim"], act_layer)


def check_backbone(backbone):
    get_backbone(backbone)
    if backbone not in musc_backbones():
        raise ConfigError(f"MuSc runs on a CLIP or DINOv2 backbone, not {backbone}: choose one of "
                          f"{', '.join(musc_backbones())}")


def build_tower(backbone, weights_path=None, architecture=None, quick_gelu=None):
    check_backbone(backbone)
    spec = get_backbone(backbone)
    architecture = {key: value for key, value in (architecture or {}).items() if value is not None}
    if architecture and weights_path is not None:
        raise ConfigError("model.clip_architecture replaces the CLIP's sizes, so no weights file fits it: "
                          "set backbone.pretrained=false")
    if spec.family == "clip":
        tower = build_clip_tower(backbone, architecture, quick_gelu)
    else:
        # quick_gelu is CLIP's alone: DINOv2 keeps its GELU whatever it says
        if architecture:
            raise ConfigError(f"model.clip_architecture applies to CLIP backbones only; set its sizes to null for "
                              f"{backbone}")
        tower = spec.build()
    if weights_path is not None:
        load_tower_weights(tower, weights_path, backbone, spec.tower)
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    return tower.eval()


def load_tower_weights(tower, path, backbone, prefix):
    state = load_state_dict(path)
    _, entry = find_entry(path)
    if entry is not None and entry["convert"] is not None:
        state = entry["convert"](state)
    if prefix:
        state = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
    own = tower.state_dict()
    bad = [key for key, value in own.items() if key not in state or state[key].shape != value.shape]
    if bad:
        raise BackboneError(f"{path} does not fit backbone {backbone} ({len(bad)} tensors missing or of another "
                            f"shape, first: {bad[0]})")
    tower.load_state_dict({key: state[key] for key in own})


def block_indices(backbone, layers):
    # "transformer.resblocks.5" (CLIP) or "blocks.5" (DINOv2) -> 5
    indices = []
    for layer in layers:
        head, _, number = str(layer).rpartition(".")
        if head not in ("transformer.resblocks", "blocks") or not number.isdigit():
            valid = ", ".join(list(get_backbone(backbone).layers)[:3])
            raise ConfigError(f"MuSc reads transformer blocks: model.layers must name blocks such as {valid}, ..., "
                              f"got '{layer}'")
        indices.append(int(number))
    return indices


def resize_position_embedding(pos_embed, grid):
    # the authors' open_clip copy (resize_pos_embed at load time): bicubic, align_corners false, no antialias;
    # the class token's row stays
    prefix, patches = pos_embed[:1], pos_embed[1:]
    side = int(math.sqrt(patches.shape[0]))
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def clip_tokens(tower, images, indices):
    # -> patch tokens (B, L, C) after each block in indices, L2-normalised pooled embedding (B, D), grid
    x = tower.conv1(images)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    positions = tower.positional_embedding
    if grid != tuple(tower.grid_size):
        positions = resize_position_embedding(positions, grid)
    x = tower.ln_pre(torch.cat([cls, x], dim=1) + positions.to(x.dtype))
    patches = {}
    for index, block in enumerate(tower.transformer.resblocks):
        x = block(x)
        if index in indices:
            patches[index] = x[:, 1:]
    pooled = tower.ln_post(x[:, 0]) @ tower.proj
    return [patches[index] for index in indices], F.normalize(pooled, dim=-1), grid


def dinov2_tokens(tower, images, indices):
    # -> the chosen blocks' patch tokens through the final norm (register tokens dropped), the final class token
    x, grid = tower.prepare_tokens(images)
    patches = {}
    for index, block in enumerate(tower.blocks):
        x = block(x)
        if index in indices:
            patches[index] = tower.norm(x[:, tower.num_prefix_tokens:])
    return [patches[index] for index in indices], tower.norm(x[:, 0]), grid


def extract_tokens(tower, images, indices):
    depth = len(tower.transformer.resblocks) if hasattr(tower, "transformer") else len(tower.blocks)
    if max(indices) >= depth:
        raise ConfigError(f"model.layers names block {max(indices)}, but the backbone has {depth} blocks (0..{depth - 1})")
    if hasattr(tower, "transformer"):
        return clip_tokens(tower, images, indices)
    return dinov2_tokens(tower, images, indices)
