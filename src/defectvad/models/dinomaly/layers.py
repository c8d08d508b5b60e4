# src/defectvad/models/dinomaly/layers.py
# the bottleneck and decoder pieces of Dinomaly, with anomalib's module names
from torch import nn
from torch.nn import functional as F


class LinearAttention(nn.Module):
    # softmax-free attention: phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)) with phi = elu + 1; it spreads attention
    # over the whole image instead of focusing on the query's neighbours (the paper's point)
    def __init__(self, input_dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(input_dim, input_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(input_dim, input_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]
        kv = k.transpose(-2, -1) @ v
        normaliser = 1.0 / (q * k.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True)
        x = (q @ kv) * normaliser
        x = self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))
        return self.proj_drop(x), kv


class DinomalyMLP(nn.Module):
    # fc1 -> GELU -> dropout -> fc2 -> dropout, no biases; the bottleneck also drops its input (the noise that
    # keeps the decoder from learning the identity)
    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0, bias=False,
                 apply_input_dropout=False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)
        self.apply_input_dropout = apply_input_dropout

    def forward(self, x):
        if self.apply_input_dropout:
            x = self.drop(x)
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class DecoderViTBlock(nn.Module):
    # pre-norm transformer block with linear attention; LayerNorm eps 1e-8 as anomalib's decoder
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, layer_norm_eps=1e-8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = LinearAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = DinomalyMLP(dim, int(dim * mlp_ratio), dim, drop=drop, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))
