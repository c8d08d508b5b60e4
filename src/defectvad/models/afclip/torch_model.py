# src/defectvad/models/afclip/torch_model.py
# AF-CLIP (Fang, Lv, Su, 2025) as the authors' code: CLIP's patch tokens of several blocks, each smoothed at three
# neighbourhood sizes, pass one attention adapter and CLIP's ln_post and proj, and are compared with two text
# embeddings whose prompts start with learned tokens; few-shot adds the distance to k reference images' tokens
import math

import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.clip_loading import load_clip
from defectvad.components.dynamic_buffers import DynamicBufferMixin
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.afclip.anomaly_map import AnomalyMapGenerator

BACKBONE = "clip_vit_l14_336"
TEMPERATURE = 0.07
STATE_PROMPTS = ("without defect.", "with defect.")


def gaussian_kernel(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


class SelfAttention(nn.Module):
    # the authors' CrossAttention used as self-attention: no bias on q, k, v, no residual
    def __init__(self, dim, out_dim, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, out_dim))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (layer(x).reshape(batch, length, self.heads, -1).transpose(1, 2)
                   for layer in (self.to_q, self.to_k, self.to_v))
        attention = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.to_out((attention @ v).transpose(1, 2).reshape(batch, length, -1))


class TransformerBlock(nn.Module):
    def __init__(self, dim, out_dim, heads=8, dim_head=64):
        super().__init__()
        self.attn = SelfAttention(dim, out_dim, heads, dim_head)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.attn(self.norm(x))


class Adaptor(nn.Module):
    def __init__(self, inplanes, outplanes=None):
        super().__init__()
        self.attention = TransformerBlock(inplanes, outplanes or inplanes)

    def forward(self, tokens):
        return self.attention(tokens)


class AfClipModel(DynamicBufferMixin):
    def __init__(self, backbone=BACKBONE, weights_path=None, feature_layers=(6, 12, 18, 24), memory_layers=None,
                 prompt_len=12, alpha=0.1, kernel_sizes=(1, 3, 5), kernel_sigma=4.0, map_sigma=4.0, tokenizer=None,
                 architecture=None):
        super().__init__()
        self.backbone = backbone
        self.clip = load_clip(backbone, weights_path, architecture, "AF-CLIP", f"the authors' is {BACKBONE}")
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        depth = len(self.clip.visual.transformer.resblocks)
        self.feature_layers = check_layers(feature_layers, depth, "feature_layers")
        self.memory_layers = check_layers(memory_layers or feature_layers, depth, "memory_layers")
        self.prompt_len = prompt_len
        self.alpha = alpha
        self.kernel_sizes = tuple(kernel_sizes)
        self.temperature = TEMPERATURE
        width = self.clip.visual.proj.shape[0]
        self.state_prompt_embedding = nn.Parameter(torch.empty(1, prompt_len, self.clip.token_embedding.weight.shape[1]))
        nn.init.normal_(self.state_prompt_embedding, std=0.01)
        self.adaptor = Adaptor(width, width)
        for size in self.kernel_sizes:
            self.register_buffer(f"gaussian_kernel_{size}", gaussian_kernel(size, kernel_sigma), persistent=False)
        self.register_buffer("state_prompt_tokens", self.tokenize(tokenizer), persistent=False)
        # the two state prompts' embeddings once training is done (kept with the weights); the k reference
        # images' normalised patch tokens, one row per smoothed layer
        self.register_buffer("text_features", torch.empty(0))
        self.register_buffer("memorybank", torch.empty(0))
        self.anomaly_map_generator = AnomalyMapGenerator(map_sigma)
        self.reference_store = []

    def tokenize(self, tokenizer):
        if tokenizer is None:
            raise TrainingError("AF-CLIP has no tokenizer to encode its state prompts")
        tokens = tokenizer(list(STATE_PROMPTS))
        end = int(tokens.argmax(dim=-1).max())
        if self.prompt_len + end + 1 > self.clip.context_length:
            raise ConfigError(f"model.prompt_len={self.prompt_len} learned tokens and the prompt's {end + 1} tokens "
                              f"exceed CLIP's context of {self.clip.context_length}; use a shorter prompt_len")
        # the causal mask lets nothing behind the end token reach it
        return tokens[:, :end + 1]

    def encode_state_prompt(self):
        # the learned tokens go in front of the start token of "without defect." and "with defect."
        tokens = self.state_prompt_tokens
        x = self.clip.token_embedding(tokens)
        x = torch.cat([self.state_prompt_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        length = x.shape[1]
        x = x + self.clip.positional_embedding[:length]
        x = self.clip.transformer(x, attn_mask=self.clip.attn_mask[:length, :length])
        x = self.clip.ln_final(x)
        end = self.prompt_len + tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end] @ self.clip.text_projection

    def state_text_features(self):
        # in training the prompts learn and are encoded each step; in evaluation once, then kept
        if self.training:
            return F.normalize(self.encode_state_prompt(), dim=-1)
        if self.text_features.numel() == 0:
            with torch.no_grad():
                self.text_features = F.normalize(self.encode_state_prompt(), dim=-1)
        return self.text_features

    def clear_text_features(self):
        self.text_features = torch.empty(0, device=self.text_features.device)

    def position_embedding(self, grid):
        # the authors resize the patch grid's position embeddings bilinearly (not open_clip's bicubic)
        pos = self.clip.visual.positional_embedding
        side = int(math.sqrt(pos.shape[0] - 1))
        if tuple(grid) == (side, side):
            return pos
        patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=tuple(grid), mode="bilinear")
        return torch.cat([pos[:1], patches.flatten(2).transpose(1, 2)[0]])

    def encode_image(self, images, layers):
        # {block (1-based): its tokens, class token first, before ln_post}, the patch grid
        visual = self.clip.visual
        x = visual.conv1(images)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = visual.ln_pre(x + self.position_embedding(grid).to(x.dtype))
        tokens = {}
        for index, block in enumerate(visual.transformer.resblocks[:max(layers)]):
            x = block(x)
            if index + 1 in layers:
                tokens[index + 1] = x
        return tokens, tuple(grid)

    def aggregate_neighbor(self, tokens, grid, size):
        # each patch token becomes the Gaussian-weighted sum of its size x size neighbours (zeros outside)
        if size == 1:
            return tokens
        batch, _, width = tokens.shape
        patches = tokens[:, 1:].transpose(1, 2).reshape(batch * width, 1, *grid)
        kernel = getattr(self, f"gaussian_kernel_{size}")[None, None].to(patches.dtype)
        patches = F.conv2d(patches, kernel, padding=size // 2).reshape(batch, width, -1).transpose(1, 2)
        return torch.cat([tokens[:, :1], patches], dim=1)

    def aggregate_neighbors(self, layer_tokens, grid):
        return [self.aggregate_neighbor(tokens, grid, size) for tokens in layer_tokens for size in self.kernel_sizes]

    def detect_encode_image(self, encoded, grid):
        visual = self.clip.visual
        layer_tokens = [encoded[layer] for layer in self.feature_layers]
        return [visual.ln_post(self.adaptor(t)) @ visual.proj for t in self.aggregate_neighbors(layer_tokens, grid)]

    def detect_forward_seg(self, images, encoded=None):
        # zero-shot: (image probability of "with defect" from the class token (B,), patch map (B, 1, h, w),
        # the adapted tokens of each smoothed layer for the alignment loss)
        text_features = self.state_text_features()
        encoded, grid = encoded or self.encode_image(images, self.feature_layers)
        tokens = self.detect_encode_image(encoded, grid)
        logits = sum(F.normalize(t, dim=-1) @ text_features.T / self.temperature for t in tokens)
        prob = logits.softmax(dim=-1)[..., 1]
        return prob[:, 0], prob[:, 1:].reshape(-1, 1, *grid), tokens

    def memory_tokens(self, images, encoded=None):
        encoded, grid = encoded or self.encode_image(images, self.memory_layers)
        tokens = self.aggregate_neighbors([encoded[layer] for layer in self.memory_layers], grid)
        return torch.stack([F.normalize(t, dim=-1)[:, 1:] for t in tokens], dim=1), grid

    @torch.no_grad()
    def collect(self, images):
        tokens, _ = self.memory_tokens(images)
        self.reference_store.append(tokens)

    def fit(self):
        if not self.reference_store:
            raise TrainingError("AF-CLIP saw no reference images; check the k_shot training images")
        tokens = torch.cat(self.reference_store)
        self.reference_store.clear()
        # (smoothed layers, k * patches, width)
        self.memorybank = tokens.transpose(0, 1).reshape(tokens.shape[1], -1, tokens.shape[-1])

    def detect_forward_memorybank(self, images, encoded=None):
        tokens, grid = self.memory_tokens(images, encoded)
        if tokens.shape[1] != self.memorybank.shape[0] or tokens.shape[-1] != self.memorybank.shape[-1]:
            raise TrainingError("AF-CLIP's reference tokens were stored with other layers or another CLIP; "
                                "fit it again on the k reference images")
        distances = [(1 - tokens[:, i] @ bank.T).amin(dim=-1) / 2 for i, bank in enumerate(self.memorybank)]
        scores = torch.stack(distances).mean(dim=0)
        return scores.amax(dim=-1), scores.reshape(-1, 1, *grid)

    def forward(self, images):
        if self.training:
            return self.detect_forward_seg(images)
        with torch.no_grad():
            # one pass through the image tower for both the adapted and the memory blocks
            few_shot = self.memorybank.numel() > 0
            layers = sorted(set(self.feature_layers) | set(self.memory_layers if few_shot else ()))
            encoded = self.encode_image(images, layers)
            score, patch_map, _ = self.detect_forward_seg(images, encoded)
            if few_shot:
                memory_score, memory_map = self.detect_forward_memorybank(images, encoded)
                patch_map = memory_map + self.alpha * patch_map
                score = memory_score + self.alpha * score
        return InferenceBatch(pred_score=score, anomaly_map=self.anomaly_map_generator(patch_map, images.shape[-2:]))


def check_layers(layers, depth, key):
    layers = [int(layer) for layer in layers]
    if not layers or any(layer < 1 or layer > depth for layer in layers):
        raise ConfigError(f"model.{key} are block numbers from 1 to {depth} (1-based, as the authors'), got {layers}")
    return tuple(layers)
