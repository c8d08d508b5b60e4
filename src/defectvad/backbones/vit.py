# src/defectvad/backbones/vit.py
# Vision Transformer with timm's parameter names: DeiT distilled and DINOv2 (with or without registers).
# Layers readable by the feature extractor: "blocks.0".."blocks.{depth-1}" (raw block outputs) and "norm"
# (the final LayerNorm over the last block's tokens).
import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from defectvad.errors import BackboneError


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_timm(pos_embed, grid, new_grid, num_prefix_tokens, antialias=True):
    # timm's resample_abs_pos_embed: bicubic to the new grid size, antialias on (anomalib's TimmFeatureExtractor
    # turns it off for ONNX), prefix positions kept
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patches = patches.float().reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def resample_dinov2(pos_embed, grid, new_grid, num_prefix_tokens, offset, antialias):
    # the DINOv2 repository's interpolate_pos_encoding: untouched for the same square grid; else bicubic with
    # scale factor (new + offset) / old when offset is set (0.1 without registers), the target size when it is
    # 0 (0.0 and antialias on for the register models, as its hub builders set them)
    if new_grid[0] == new_grid[1] and new_grid[0] * new_grid[1] == grid[0] * grid[1]:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patches = patches.float().reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    if offset:
        scale = ((new_grid[0] + offset) / grid[0], (new_grid[1] + offset) / grid[1])
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def block_index(layer, depth):
    match = re.fullmatch(r"blocks\.(\d+)", layer)
    if layer == "norm":
        return depth - 1
    if match and int(match.group(1)) < depth:
        return int(match.group(1))
    valid = [f"blocks.{i}" for i in range(depth)] + ["norm"]
    raise BackboneError(f"unknown layer '{layer}'; choose from: {', '.join(valid)}")


def to_feature_map(patches, grid):
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], grid[0], grid[1])


def run_blocks(model, images, layers):
    # the tokens after each wanted block ("norm": the final LayerNorm after the last block), up to the deepest one
    depth = len(model.blocks)
    wanted = {layer: block_index(layer, depth) for layer in layers}
    x, grid = model.prepare_tokens(images)
    outputs = {}
    for i in range(max(wanted.values()) + 1):
        x = model.blocks[i](x)
        for layer, index in wanted.items():
            if index == i:
                outputs[layer] = model.norm(x) if layer == "norm" else x
    return outputs, grid


class VisionTransformer(nn.Module):
    # no_embed_class: the position embedding covers only the patches (timm's layout of DINOv2 with registers);
    # pos_embed_rule: "timm" (DeiT), "dinov2" (DINOv2, with interpolate_offset / interpolate_antialias) or
    # "timm_no_antialias" (timm's without antialias: DINOv2 as anomalib's TimmFeatureExtractor runs it)
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 num_classes=1000, distilled=False, reg_tokens=0, no_embed_class=False, init_values=None,
                 pos_embed_rule="timm", interpolate_offset=0.1, interpolate_antialias=False):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_reg_tokens = reg_tokens
        self.distilled = distilled
        self.num_prefix_tokens = 1 + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.pos_embed_rule = pos_embed_rule
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        positions = self.grid[0] * self.grid[1] + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes and distilled else None
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, grid):
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if self.pos_embed_rule == "dinov2":
            return resample_dinov2(self.pos_embed, self.grid, grid, prefix, self.interpolate_offset,
                                   self.interpolate_antialias)
        return resample_timm(self.pos_embed, self.grid, grid, prefix, antialias=self.pos_embed_rule == "timm")

    def prepare_tokens(self, images):
        x = self.patch_embed(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        pos_embed = self.position_embedding(grid)
        if self.no_embed_class:
            return torch.cat(prefix + [x + pos_embed], dim=1), grid
        return torch.cat(prefix + [x], dim=1) + pos_embed, grid

    def split_tokens(self, x):
        tokens = {"cls": x[:, 0], "patches": x[:, self.num_prefix_tokens:]}
        if self.distilled:
            tokens["dist"] = x[:, 1]
        if self.num_reg_tokens:
            start = 1 + int(self.distilled)
            tokens["registers"] = x[:, start:start + self.num_reg_tokens]
        return tokens

    def forward_tokens(self, images, layers):
        outputs, _ = run_blocks(self, images, layers)
        return {layer: self.split_tokens(x) for layer, x in outputs.items()}

    def forward_layers(self, images, layers):
        outputs, grid = run_blocks(self, images, layers)
        return {layer: to_feature_map(x[:, self.num_prefix_tokens:], grid) for layer, x in outputs.items()}

    def truncate(self, layers):
        keep = max(block_index(layer, len(self.blocks)) for layer in layers)
        self.blocks = self.blocks[:keep + 1]
        if "norm" not in layers:
            self.norm = None
        self.head = None
        self.head_dist = None

    def forward(self, images):
        x, _ = self.prepare_tokens(images)
        x = self.norm(self.blocks(x))
        if self.distilled:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


def convert_dinov2_official(state_dict):
    # the DINOv2 repository's key names -> timm's: mask_token dropped; blocks saved in chunks
    # ("blocks.<chunk>.<index>.") flattened; with registers the class position is folded into cls_token and
    # pos_embed keeps the patch positions only (timm's no_embed_class layout)
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


deit = partial(VisionTransformer, patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=True,
               num_classes=1000)
dinov2 = partial(VisionTransformer, img_size=518, patch_size=14, num_classes=0, init_values=1e-5,
                 pos_embed_rule="dinov2", interpolate_offset=0.1, interpolate_antialias=False)
dinov2_reg4 = partial(dinov2, reg_tokens=4, no_embed_class=True, interpolate_offset=0.0,
                      interpolate_antialias=True)
VIT_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
VIT_BASE = dict(embed_dim=768, depth=12, num_heads=12)
VIT_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)

# zero-argument builders of the full networks, by backbone name
VIT_BUILDERS = {
    "deit_base_distilled_patch16_224": partial(deit, img_size=224),
    "deit_base_distilled_patch16_384": partial(deit, img_size=384),
    "dinov2_vits14": partial(dinov2, **VIT_SMALL),
    "dinov2_vitb14": partial(dinov2, **VIT_BASE),
    "dinov2_vitl14": partial(dinov2, **VIT_LARGE),
    "dinov2_vits14_reg4": partial(dinov2_reg4, **VIT_SMALL),
    "dinov2_vitb14_reg4": partial(dinov2_reg4, **VIT_BASE),
    "dinov2_vitl14_reg4": partial(dinov2_reg4, **VIT_LARGE),
}
