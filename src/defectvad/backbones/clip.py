# src/defectvad/backbones/clip.py
# CLIP as open_clip builds it (ViT image tower, causal text transformer), with open_clip's parameter names so
# that an open_clip state dict loads strictly.
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from defectvad.errors import BackboneError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BLOCK_PREFIX = "transformer.resblocks."


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, act_layer=nn.GELU, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act_layer=nn.GELU):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act_layer) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def resize_position_embedding(pos_embed, grid):
    # open_clip's resize_pos_embed: the class token's row stays, the patch grid is resized bicubically
    prefix, patches = pos_embed[:1], pos_embed[1:]
    old = int(math.sqrt(patches.shape[0]))
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([prefix, patches], dim=0)


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, image_size, patch_size, width, layers, heads, output_dim, act_layer=nn.GELU):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = width
        self.output_dim = output_dim
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act_layer)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def layer_names(self):
        return [f"{BLOCK_PREFIX}{i}" for i in range(len(self.transformer.resblocks))]

    def block_index(self, layer):
        names = self.layer_names()
        if layer not in names:
            raise BackboneError(f"unknown layer '{layer}' of the CLIP image tower; choose from: {', '.join(names)}")
        return names.index(layer)

    def position_embedding(self, grid):
        if tuple(grid) == self.grid_size:
            return self.positional_embedding
        return resize_position_embedding(self.positional_embedding, grid)

    def embed_tokens(self, images):
        # the class token and the patch tokens with their position embeddings, before ln_pre
        x = self.conv1(images)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding(grid).to(x.dtype)

    def embed(self, images):
        return self.ln_pre(self.embed_tokens(images))

    def encode_tokens(self, tokens):
        # ln_pre, the blocks and ln_post over any sequence of embedded tokens (WinCLIP: a window of patches
        # behind the class token); the class token's output @ proj is the pooled embedding
        return self.ln_post(self.transformer(self.ln_pre(tokens)))

    def forward(self, images):
        if self.proj is None:
            raise BackboneError("this CLIP image tower was truncated to its blocks; it has no pooled output")
        x = self.embed(images)
        x = self.ln_post(self.transformer(x))
        return x[:, 0] @ self.proj

    def forward_tokens(self, images, layers):
        wanted = {layer: self.block_index(layer) for layer in layers}
        deepest = max(wanted.values())
        x = self.embed(images)
        by_index = {}
        for index, block in enumerate(self.transformer.resblocks[:deepest + 1]):
            x = block(x)
            if index in wanted.values():
                by_index[index] = x
        return {layer: {"patches": by_index[i][:, 1:], "cls": by_index[i][:, 0]} for layer, i in wanted.items()}

    def forward_layers(self, images, layers):
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self.forward_tokens(images, layers)
        return {layer: t["patches"].transpose(1, 2).reshape(images.shape[0], -1, h, w) for layer, t in tokens.items()}

    def truncate(self, layers):
        deepest = max(self.block_index(layer) for layer in layers)
        self.transformer.resblocks = self.transformer.resblocks[:deepest + 1]
        self.ln_post = None
        self.proj = None
        return self


def causal_mask(length):
    return torch.full((length, length), float("-inf")).triu_(1)


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_size, patch_size, vision_width, vision_layers, text_width, text_heads,
                 text_layers, context_length=77, vocab_size=49408, quick_gelu=False, vision_head_width=64):
        super().__init__()
        act_layer = QuickGELU if quick_gelu else nn.GELU
        self.visual = VisionTransformer(image_size, patch_size, vision_width, vision_layers,
                                        vision_width // vision_head_width, embed_dim, act_layer)
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.transformer = Transformer(text_width, text_layers, text_heads, act_layer)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        self.init_text_parameters()

    def init_text_parameters(self):
        # open_clip's initialisation of the text tower
        width, layers = self.transformer.width, len(self.transformer.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, images, normalize=False):
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize=False):
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        # the end-of-text token has the highest id in the vocabulary: its position is the argmax
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def strip_module_prefix(state_dict):
    # open_clip's training checkpoints may carry DistributedDataParallel's "module." prefix
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_tinyclip(state_dict):
    # TinyCLIP's checkpoints hold the towers under _image_encoder, _text_encoder and _logit_scale, each possibly
    # wrapped by DistributedDataParallel ("module.")
    converted = {}
    for key, value in strip_module_prefix(state_dict).items():
        for prefix in ("_image_encoder.", "_text_encoder.", "_logit_scale."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                key = key[7:] if key.startswith("module.") else key
                break
        converted[key] = value
    return converted


# the published towers' sizes (open_clip's and TinyCLIP's model configs); the registry builds them from these
CLIP_ARCHITECTURES = {
    "clip_vit_b16_plus_240": dict(embed_dim=640, image_size=240, patch_size=16, vision_width=896, vision_layers=12,
                                  text_width=640, text_heads=10, text_layers=12, context_length=77, vocab_size=49408,
                                  quick_gelu=False),
    "clip_vit_l14_336": dict(embed_dim=768, image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
                             text_width=768, text_heads=12, text_layers=12, context_length=77, vocab_size=49408,
                             quick_gelu=True),
    "tinyclip_vit_8m_16_text_3m": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=256, vision_layers=10,
                                       text_width=256, text_heads=4, text_layers=3, context_length=77,
                                       vocab_size=49408, quick_gelu=False),
    "tinyclip_vit_39m_16_text_19m": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=512,
                                         vision_layers=12, text_width=512, text_heads=8, text_layers=6,
                                         context_length=77, vocab_size=49408, quick_gelu=False),
}
