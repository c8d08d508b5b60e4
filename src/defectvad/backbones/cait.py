# src/defectvad/backbones/cait.py
# CaiT (class-attention image transformer) with timm's parameter names. The patch tokens run through
# talking-heads blocks without any class token; the class token joins only in the class-attention blocks
# (blocks_token_only). Readable layers: "blocks.0".."blocks.{depth-1}" and "norm" (final LayerNorm on the
# last block's patch tokens). Other input sizes: timm's resample_abs_pos_embed rule (bicubic to the new grid,
# antialias on); timm itself fixes CaiT's input size.
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from defectvad.backbones.vit import Mlp, PatchEmbed, block_index, resample_timm, run_blocks, to_feature_map


class TalkingHeadAttention(nn.Module):
    # proj_l mixes the heads' logits before the softmax, proj_w the heads' weights after it
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = self.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = self.proj_w(logits.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class ClassAttention(nn.Module):
    # only the class token (first position) queries; it attends to itself and all patches
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, _, dim = x.shape
        q, k, v = (self.split_heads(t) for t in (self.q(x[:, :1]), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, 1, dim))

    def split_heads(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)


class LayerScaleBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TalkingHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ClassAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, cls):
        cls = cls + self.gamma_1 * self.attn(self.norm1(torch.cat([cls, x], dim=1)))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class Cait(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=24, num_heads=8, mlp_ratio=4.0,
                 num_classes=1000, init_values=1e-5, depth_token_only=2):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 0
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.blocks = nn.Sequential(*[LayerScaleBlock(embed_dim, num_heads, mlp_ratio, init_values)
                                      for _ in range(depth)])
        self.blocks_token_only = nn.ModuleList([ClassAttentionBlock(embed_dim, num_heads, 4.0, init_values)
                                                for _ in range(depth_token_only)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def prepare_tokens(self, images):
        x = self.patch_embed(images)
        grid = tuple(x.shape[-2:])
        return x.flatten(2).transpose(1, 2) + resample_timm(self.pos_embed, self.grid, grid, 0), grid

    def forward_tokens(self, images, layers):
        outputs, _ = run_blocks(self, images, layers)
        return {layer: {"patches": x} for layer, x in outputs.items()}

    def forward_layers(self, images, layers):
        outputs, grid = run_blocks(self, images, layers)
        return {layer: to_feature_map(x, grid) for layer, x in outputs.items()}

    def truncate(self, layers):
        keep = max(block_index(layer, len(self.blocks)) for layer in layers)
        self.blocks = self.blocks[:keep + 1]
        if "norm" not in layers:
            self.norm = None
        # the class token only enters the class-attention blocks, dropped with them
        self.cls_token = None
        self.blocks_token_only = None
        self.head = None

    def forward(self, images):
        x = self.blocks(self.prepare_tokens(images)[0])
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.blocks_token_only:
            cls = block(x, cls)
        return self.head(self.norm(cls[:, 0]))


cait = partial(Cait, patch_size=16, num_classes=1000)

# zero-argument builders of the full networks, by backbone name
CAIT_BUILDERS = {
    "cait_s24_224": partial(cait, img_size=224, embed_dim=384, depth=24, num_heads=8, init_values=1e-5),
    "cait_m48_448": partial(cait, img_size=448, embed_dim=768, depth=48, num_heads=16, init_values=1e-6),
}
