# src/defectvad/models/inp_former/layers.py
# the INP extractor's and the INP-guided decoder's blocks, with anomalib's module names: cross-attention whose
# queries come from one token set (q) and keys and values from another (kv)
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.models.dinomaly.layers import DinomalyMLP

# anomalib's blocks: MLP ratio 4, biased q/kv projections, LayerNorm eps 1e-8
MLP_RATIO = 4.0
LAYER_NORM_EPS = 1e-8


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project(self, x, y):
        # -> q (B, heads, L, d) from x (B, L, C); k, v (B, heads, N, d) from y (B, N, C)
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        kv = self.kv(y).reshape(batch, y.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    def attend(self, attn, v):
        batch, _, length, _ = attn.shape
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, length, -1))


class AggregationAttention(CrossAttention):
    # the INP extractor: learnable queries gather the patch tokens by softmax attention (scaled dot product)
    def forward(self, x, y):
        q, k, v = self.project(x, y)
        attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return self.attend(attn.softmax(dim=-1), v)


class PrototypeAttention(CrossAttention):
    # INP-guided attention: cosine between patch queries and prototype keys, times a learnt scale per head, through
    # a ReLU instead of a softmax; the output lies in the span of the prototypes' values
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))

    def forward(self, x, prototypes):
        q, k, v = self.project(x, prototypes)
        attn = F.relu((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.learn_scale)
        return self.attend(attn, v), attn


class CrossAttentionBlock(nn.Module):
    # pre-norm: norm1 (shared by both token sets), attention, norm2, MLP (no biases)
    attention = None

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = self.attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = DinomalyMLP(dim, int(dim * MLP_RATIO), dim, bias=False)


class AggregationBlock(CrossAttentionBlock):
    attention = AggregationAttention

    def forward(self, x, y):
        x = x + self.attn(self.norm1(x), self.norm1(y))
        return x + self.mlp(self.norm2(x))


class PrototypeBlock(CrossAttentionBlock):
    # the paper drops the residual around the attention, so an anomalous query cannot pass by the prototypes
    attention = PrototypeAttention

    def forward(self, x, prototypes):
        x = self.attn(self.norm1(x), self.norm1(prototypes))[0]
        return x + self.mlp(self.norm2(x))
