# tests/test_vit.py
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectvad.backbones.cait import CAIT_BUILDERS, Cait, ClassAttention, TalkingHeadAttention
from defectvad.backbones.vit import VIT_BUILDERS, Attention, VisionTransformer, convert_dinov2_official
from defectvad.errors import BackboneError

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias"]


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    torch.manual_seed(0)


def deit():
    return VisionTransformer(distilled=True, num_classes=10, **TINY).eval()


def dinov2(reg_tokens=0):
    settings = dict(reg_tokens=4, no_embed_class=True, interpolate_offset=0.0, interpolate_antialias=True)
    return VisionTransformer(num_classes=0, init_values=1e-5, pos_embed_rule="dinov2",
                             **(settings if reg_tokens else {}), **TINY).eval()


def cait():
    return Cait(num_classes=10, **TINY).eval()


def shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def blocks(keys, depth=2):
    return [f"blocks.{i}.{key}" for i in range(depth) for key in keys]


def test_deit_distilled_has_timm_names():
    expected = {"cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias",
                *blocks(BLOCK_KEYS)}
    found = shapes(deit())
    assert set(found) == expected
    assert found["pos_embed"] == (1, 16 + 2, 32)
    assert found["dist_token"] == (1, 1, 32)
    assert found["blocks.0.attn.qkv.weight"] == (96, 32)
    assert found["blocks.1.mlp.fc1.weight"] == (128, 32)
    assert found["head_dist.weight"] == (10, 32)


def test_dinov2_has_timm_names_with_and_without_registers():
    plain = shapes(dinov2())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", *blocks(BLOCK_KEYS + ["ls1.gamma", "ls2.gamma"])}
    assert set(plain) == expected
    assert plain["pos_embed"] == (1, 17, 32)
    registers = shapes(dinov2(reg_tokens=4))
    assert set(registers) == expected | {"reg_token"}
    assert registers["reg_token"] == (1, 4, 32)
    assert registers["pos_embed"] == (1, 16, 32)
    assert registers["blocks.1.ls2.gamma"] == (32,)


def test_cait_has_timm_names():
    cait_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "attn.proj_l.weight", "attn.proj_l.bias", "attn.proj_w.weight", "attn.proj_w.bias",
                  "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                  "gamma_1", "gamma_2"]
    token_block = ["norm1.weight", "norm1.bias", "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias",
                   "attn.v.weight", "attn.v.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                   "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "gamma_1", "gamma_2"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "head.weight", "head.bias", *blocks(cait_block),
                *[f"blocks_token_only.{i}.{key}" for i in range(2) for key in token_block]}
    found = shapes(cait())
    assert set(found) == expected
    assert found["pos_embed"] == (1, 16, 32)
    assert found["blocks.0.attn.proj_l.weight"] == (2, 2)


def test_real_configs_have_reference_shapes():
    expected = {
        "deit_base_distilled_patch16_224": ("pos_embed", (1, 198, 768), 12, 87.34),
        "deit_base_distilled_patch16_384": ("pos_embed", (1, 578, 768), 12, 87.63),
        "dinov2_vits14": ("pos_embed", (1, 1370, 384), 12, 22.06),
        "dinov2_vitb14_reg4": ("reg_token", (1, 4, 768), 12, 86.58),
        "dinov2_vitl14_reg4": ("pos_embed", (1, 1369, 1024), 24, 304.37),
        "cait_s24_224": ("pos_embed", (1, 196, 384), 24, 46.92),
        "cait_m48_448": ("pos_embed", (1, 784, 768), 48, 356.46),
    }
    builders = {**VIT_BUILDERS, **CAIT_BUILDERS}
    assert len(builders) == 10
    with torch.device("meta"):
        for name, (key, shape, depth, millions) in expected.items():
            model = builders[name]()
            assert tuple(model.state_dict()[key].shape) == shape, name
            assert len(model.blocks) == depth, name
            assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions, name


def official_layout(model, chunks):
    # the DINOv2 repository's names for a model with registers, blocks saved in chunks
    state = model.state_dict()
    depth = len(model.blocks)
    out = {"mask_token": torch.randn(1, 32), "register_tokens": torch.randn(1, 4, 32),
           "cls_token": torch.randn(1, 1, 32), "pos_embed": torch.randn(1, 17, 32)}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            chunk = index // (depth // chunks)
            out[key.replace(f"blocks.{index}.", f"blocks.{chunk}.{index}.", 1)] = torch.randn_like(value)
        elif key not in ("reg_token", "cls_token", "pos_embed"):
            out[key] = torch.randn_like(value)
    return out


def test_official_dinov2_layout_converts_strictly():
    model = dinov2(reg_tokens=4)
    official = official_layout(model, chunks=2)
    assert "blocks.1.1.norm1.weight" in official
    model.load_state_dict(convert_dinov2_official(official), strict=True)
    assert torch.equal(model.blocks[1].norm1.weight, official["blocks.1.1.norm1.weight"])
    # the DINOv2 code's tokens: class + its position, registers, patches + their positions
    images = torch.randn(2, 3, 32, 32)
    patches = F.conv2d(images, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=8)
    patches = patches.flatten(2).transpose(1, 2) + official["pos_embed"][:, 1:]
    cls = (official["cls_token"] + official["pos_embed"][:, :1]).expand(2, -1, -1)
    expected = torch.cat([cls, official["register_tokens"].expand(2, -1, -1), patches], dim=1)
    tokens, grid = model.prepare_tokens(images)
    assert grid == (4, 4)
    assert torch.allclose(tokens, expected, atol=1e-6)


def test_official_dinov2_without_registers_drops_only_the_mask_token():
    model = dinov2()
    official = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    converted = convert_dinov2_official({**official, "mask_token": torch.zeros(1, 32)})
    assert converted.keys() == official.keys()
    assert torch.equal(converted["pos_embed"], official["pos_embed"])
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("build", [deit, lambda: dinov2(reg_tokens=4), cait])
def test_layers_are_patch_maps_of_the_tokens(build):
    model = build()
    images = torch.randn(2, 3, 32, 48)
    layers = ["blocks.0", "blocks.1", "norm"]
    maps = model.forward_layers(images, layers)
    tokens = model.forward_tokens(images, layers)
    for layer in layers:
        assert maps[layer].shape == (2, 32, 4, 6)
        patches = tokens[layer]["patches"]
        assert patches.shape == (2, 24, 32)
        assert torch.equal(maps[layer], patches.reshape(2, 4, 6, 32).permute(0, 3, 1, 2))
    assert model.num_prefix_tokens + 24 == model.prepare_tokens(images)[0].shape[1]


def test_prefix_tokens_are_split_by_kind():
    tokens = deit().forward_tokens(torch.randn(2, 3, 32, 32), ["blocks.1"])["blocks.1"]
    assert tokens["cls"].shape == tokens["dist"].shape == (2, 32)
    model = dinov2(reg_tokens=4)
    tokens = model.forward_tokens(torch.randn(2, 3, 32, 32), ["norm"])["norm"]
    assert tokens["registers"].shape == (2, 4, 32)
    x, _ = model.prepare_tokens(torch.randn(2, 3, 32, 32))
    assert "dist" not in tokens and model.num_prefix_tokens == 5


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(BackboneError, match="blocks.0, blocks.1, norm"):
        deit().forward_layers(torch.randn(1, 3, 32, 32), ["layer3"])


@pytest.mark.parametrize("build", [deit, cait])
def test_truncate_drops_later_blocks_and_heads(build):
    model = build()
    images = torch.randn(1, 3, 32, 32)
    before = model.forward_layers(images, ["blocks.0"])["blocks.0"]
    model.truncate(["blocks.0"])
    keys = model.state_dict().keys()
    assert any(k.startswith("blocks.0.") for k in keys)
    assert not any(k.startswith(("blocks.1.", "norm.", "head", "blocks_token_only")) for k in keys)
    assert torch.equal(model.forward_layers(images, ["blocks.0"])["blocks.0"], before)


def test_truncate_keeps_the_final_norm_when_read():
    model = dinov2()
    model.truncate(["norm"])
    assert "norm.weight" in model.state_dict() and "blocks.1.ls1.gamma" in model.state_dict()


def cubic_matrix(size_in, size_out, scale):
    # PyTorch's bicubic (A = -0.75, half-pixel centres, edge clamping) at a given scale factor, as a matrix
    def kernel(d):
        d = abs(d)
        if d <= 1:
            return ((1.25 * d - 2.25) * d) * d + 1
        if d < 2:
            return ((-0.75 * d + 3.75) * d - 6) * d + 3
        return 0.0

    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = (i + 0.5) / scale - 0.5
        base = math.floor(source)
        for j in range(base - 1, base + 3):
            weights[i, min(max(j, 0), size_in - 1)] += kernel(source - j)
    return torch.tensor(weights, dtype=torch.float32)


def test_dinov2_positions_follow_the_offset_rule():
    model = dinov2()
    images = torch.randn(1, 3, 48, 40)
    tokens, grid = model.prepare_tokens(images)
    assert grid == (6, 5)
    table = model.pos_embed[0, 1:].reshape(4, 4, 32).detach()
    rows, cols = cubic_matrix(4, 6, (6 + 0.1) / 4), cubic_matrix(4, 5, (5 + 0.1) / 4)
    expected = torch.einsum("ia,jb,abc->ijc", rows, cols, table).reshape(30, 32)
    patches = model.patch_embed(images).flatten(2).transpose(1, 2)[0]
    assert torch.allclose(tokens[0, 1:] - patches, expected, atol=1e-5)
    assert torch.allclose(tokens[0, 0], (model.cls_token + model.pos_embed[:, 0])[0, 0])
    # the offset matters: the plain target-size interpolation differs
    by_size = F.interpolate(table.permute(2, 0, 1)[None], size=(6, 5), mode="bicubic")[0].permute(1, 2, 0)
    assert not torch.allclose(by_size.reshape(30, 32), expected, atol=1e-3)
    # the trained grid is used as stored
    same, _ = model.prepare_tokens(torch.randn(1, 3, 32, 32))
    assert same.shape[1] == 17
    assert torch.equal(model.position_embedding((4, 4)), model.pos_embed)


def test_dinov2_register_positions_resize_with_antialias():
    model = dinov2(reg_tokens=4)
    table = model.pos_embed.detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(3, 7), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 21, 32)
    assert torch.allclose(model.position_embedding((3, 7)), expected)


def test_deit_positions_resize_like_timm():
    model = deit()
    images = torch.randn(1, 3, 24, 56)
    tokens, grid = model.prepare_tokens(images)
    table = model.pos_embed[:, 2:].detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(3, 7), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(21, 32)
    patches = model.patch_embed(images).flatten(2).transpose(1, 2)[0]
    assert grid == (3, 7)
    assert torch.allclose(tokens[0, 2:] - patches, expected, atol=1e-6)
    assert torch.allclose(tokens[0, 1], (model.dist_token + model.pos_embed[:, 1])[0, 0])


def heads(x, count):
    return x.reshape(x.shape[0], x.shape[1], count, -1).transpose(1, 2)


def test_attention_is_scaled_dot_product_softmax():
    attention = Attention(8, num_heads=2)
    x = torch.randn(1, 3, 8)
    q, k, v = (heads(t, 2) for t in F.linear(x, attention.qkv.weight, attention.qkv.bias).split(8, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(1, 3, 8))
    assert torch.allclose(attention(x), expected, atol=1e-6)


def test_talking_heads_mix_heads_before_and_after_softmax():
    attention = TalkingHeadAttention(8, num_heads=2)
    x = torch.randn(1, 3, 8)
    q, k, v = (heads(t, 2) for t in attention.qkv(x).split(8, dim=-1))
    logits = q @ k.transpose(-2, -1) / math.sqrt(4)
    mix = lambda layer, t: torch.einsum("hg,bgij->bhij", layer.weight, t) + layer.bias[None, :, None, None]
    weights = mix(attention.proj_w, torch.softmax(mix(attention.proj_l, logits), dim=-1))
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(1, 3, 8))
    assert torch.allclose(attention(x), expected, atol=1e-6)


def test_class_attention_queries_with_the_class_token_only():
    attention = ClassAttention(8, num_heads=2)
    x = torch.randn(1, 4, 8)
    q, k, v = heads(attention.q(x[:, :1]), 2), heads(attention.k(x), 2), heads(attention.v(x), 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(1, 1, 8))
    assert torch.allclose(attention(x), expected, atol=1e-6)


def test_distilled_logits_average_both_heads():
    model = deit()
    images = torch.randn(2, 3, 32, 32)
    x = model.norm(model.blocks(model.prepare_tokens(images)[0]))
    expected = (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    assert torch.allclose(model(images), expected, atol=1e-6)
