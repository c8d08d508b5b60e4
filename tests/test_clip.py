# tests/test_clip.py
import gzip
import math

import pytest
import torch
import torch.nn.functional as F

from defectvad.backbones.clip import CLIP, CLIP_ARCHITECTURES, ResidualAttentionBlock, resize_position_embedding
from defectvad.backbones.registry import get_backbone
from defectvad.backbones.tokenizer import ClipTokenizer, bytes_to_unicode, load_tokenizer
from defectvad.errors import BackboneError

TINY = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, text_width=32, text_heads=2,
            text_layers=2, context_length=12, vocab_size=40, vision_head_width=16)


@pytest.fixture
def tiny_clip(single_thread):
    torch.manual_seed(0)
    return CLIP(**TINY).eval()


def block_keys(prefix):
    names = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    return {f"{prefix}transformer.resblocks.{i}.{name}" for i in range(2) for name in names}


def test_parameter_names_and_shapes_follow_open_clip(tiny_clip):
    state = tiny_clip.state_dict()
    visual = {"visual." + k for k in ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                                      "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj"]}
    text = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
            "logit_scale"}
    assert set(state) == visual | block_keys("visual.") | text | block_keys("")
    assert state["visual.positional_embedding"].shape == (17, 32)
    assert state["visual.conv1.weight"].shape == (32, 3, 8, 8)
    assert state["visual.proj"].shape == (32, 16)
    assert state["text_projection"].shape == (32, 16)
    assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape == (128, 32)
    assert tiny_clip.visual.transformer.resblocks[0].attn.num_heads == 2
    assert tiny_clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def reference_block(block, x, mask=None):
    # the residual attention block written out: pre-norm, multi-head attention, pre-norm GELU MLP
    width, heads = x.shape[-1], block.attn.num_heads
    y = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias)
    q, k, v = (y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).split(width, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + attended @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    y = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias)
    hidden = y @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def test_attention_block_equals_hand_computation(single_thread):
    torch.manual_seed(1)
    block = ResidualAttentionBlock(8, 2).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(block, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(x, attn_mask=mask), reference_block(block, x, mask), rtol=1e-5, atol=1e-5)
        # causal: the first token sees only itself
        assert not torch.allclose(block(x)[:, 0], block(x, attn_mask=mask)[:, 0])


def test_quick_gelu_for_openai_weights():
    model = CLIP(**{**TINY, "quick_gelu": True})
    x = torch.tensor([-1.0, 0.5, 2.0])
    expected = x * torch.sigmoid(1.702 * x)
    torch.testing.assert_close(model.transformer.resblocks[0].mlp.gelu(x), expected)
    assert CLIP_ARCHITECTURES["clip_vit_l14_336"]["quick_gelu"] is True
    assert CLIP_ARCHITECTURES["clip_vit_b16_plus_240"]["quick_gelu"] is False


def test_encode_text_reads_the_end_token(tiny_clip):
    end = TINY["vocab_size"] - 1
    text = torch.tensor([[38, 5, 7, end, 0, 0, 0, 0, 0, 0, 0, 0],
                         [38, 9, 3, 4, 11, 6, end, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        features = tiny_clip.encode_text(text)
        # the causal mask means tokens after the end token cannot matter
        noisy = text.clone()
        noisy[0, 5:] = 17
        noisy[1, 8:] = 23
        torch.testing.assert_close(tiny_clip.encode_text(noisy), features)
        # the features are the final-normed state at the end token, projected
        x = tiny_clip.token_embedding(text) + tiny_clip.positional_embedding
        mask = torch.full((12, 12), float("-inf")).triu(1)
        for block in tiny_clip.transformer.resblocks:
            x = reference_block(block, x, mask)
        x = F.layer_norm(x, (32,), tiny_clip.ln_final.weight, tiny_clip.ln_final.bias)
        expected = torch.stack([x[0, 3], x[1, 6]]) @ tiny_clip.text_projection
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
        assert tiny_clip.encode_text(text, normalize=True).norm(dim=-1).tolist() == pytest.approx([1.0, 1.0])


def test_visual_layers_tokens_and_truncation(tiny_clip):
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    visual = tiny_clip.visual
    assert (visual.patch_size, visual.embed_dim, visual.num_prefix_tokens) == (8, 32, 1)
    layers = ["transformer.resblocks.0", "transformer.resblocks.1"]
    with torch.no_grad():
        tokens = visual.forward_tokens(images, layers)
        maps = visual.forward_layers(images, layers)
        x = visual.ln_pre(torch.cat([visual.class_embedding.expand(2, 1, 32),
                                     visual.conv1(images).flatten(2).transpose(1, 2)], 1) + visual.positional_embedding)
        for layer, block in zip(layers, visual.transformer.resblocks):
            x = reference_block(block, x)
            torch.testing.assert_close(tokens[layer]["cls"], x[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tokens[layer]["patches"], x[:, 1:], rtol=1e-5, atol=1e-5)
        # patch row r, column c of the 4x4 grid is token 1 + 4r + c
        assert maps[layers[1]].shape == (2, 32, 4, 4)
        torch.testing.assert_close(maps[layers[1]][:, :, 2, 3], x[:, 1 + 4 * 2 + 3], rtol=1e-5, atol=1e-5)
        pooled = F.layer_norm(x[:, 0], (32,), visual.ln_post.weight, visual.ln_post.bias) @ visual.proj
        torch.testing.assert_close(tiny_clip.encode_image(images), pooled, rtol=1e-5, atol=1e-5)
        first = visual.forward_layers(images, layers[:1])[layers[0]]
        visual.truncate(layers[:1])
        assert sorted(k for k in visual.state_dict() if "resblocks" in k)[0].startswith("transformer.resblocks.0.")
        assert not any("resblocks.1" in k or k.startswith(("ln_post", "proj")) for k in visual.state_dict())
        torch.testing.assert_close(visual.forward_layers(images, layers[:1])[layers[0]], first)
    with pytest.raises(BackboneError, match="blocks.7.*choose from: transformer.resblocks.0"):
        visual.forward_layers(images, ["transformer.resblocks.7"])


def test_position_embedding_interpolates_for_other_sizes(tiny_clip):
    visual = tiny_clip.visual
    with torch.no_grad():
        assert visual.forward_layers(torch.randn(1, 3, 48, 40), ["transformer.resblocks.1"])[
            "transformer.resblocks.1"].shape == (1, 32, 6, 5)
        # bicubic weights sum to one: a constant grid stays constant, the class token's row is kept
        constant = torch.cat([torch.full((1, 3), 7.0), torch.full((16, 3), 2.5)])
        resized = resize_position_embedding(constant, (6, 6))
        assert resized.shape == (37, 3)
        assert resized[0].tolist() == [7.0, 7.0, 7.0]
        torch.testing.assert_close(resized[1:], torch.full((36, 3), 2.5))
        assert visual.position_embedding((4, 4)) is visual.positional_embedding


def test_backbone_settings_match_the_architectures():
    for name, size, width, blocks, check_key in [("clip_vit_b16_plus_240", 240, 896, 12, "visual.positional_embedding"),
                                                 ("clip_vit_l14_336", 336, 1024, 24, "visual.positional_embedding")]:
        spec = get_backbone(name)
        with torch.device("meta"):
            model = spec.build()
        state = model.state_dict()
        assert spec.image_size == model.visual.image_size == size
        assert spec.interpolation == "bicubic"
        assert spec.mean == (0.48145466, 0.4578275, 0.40821073)
        assert len(spec.layers) == blocks and spec.layers[f"transformer.resblocks.{blocks - 1}"][0] == width
        assert all(layer in spec.layers for layer in spec.stages)
        for entry in spec.files:
            for key, shape in entry["check"].items():
                assert tuple(state[key].shape) == tuple(shape)
            if entry["sha256"]:
                assert len(entry["sha256"]) == 64
        assert tuple(state[check_key].shape) == ((size // model.visual.patch_size) ** 2 + 1, width)


MERGES = ["l o</w>", "h e", "he l", "hel lo</w>"]


@pytest.fixture
def tiny_tokenizer(tmp_path):
    path = tmp_path / "tiny_vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + MERGES) + "\n")
    return ClipTokenizer(path, context_length=12)


def test_byte_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] == "\u0120"  # the GPT-2 / CLIP space marker


def test_bpe_on_a_tiny_vocabulary(tiny_tokenizer):
    # ids: 256 single bytes ("!" first), 256 end-of-word bytes, then one id per merge, then start and end
    assert (tiny_tokenizer.vocab_size, tiny_tokenizer.start_id, tiny_tokenizer.end_id) == (518, 516, 517)
    assert tiny_tokenizer.bpe("hello") == ["hello</w>"]
    assert tiny_tokenizer.bpe("hell") == ["hel", "l</w>"]
    assert tiny_tokenizer.encode("Hello,  hell\toh!") == [515, 256 + 11, 514, 256 + 75, 78, 256 + 71, 256 + 0]
    assert tiny_tokenizer.encode("it's &amp; 7") == [72, 256 + 83, 6, 256 + 82, 256 + 5, 256 + 22]
    ids = tiny_tokenizer(["hello hell", "oh"])
    assert ids.tolist() == [[516, 515, 514, 331, 517] + [0] * 7, [516, 78, 327, 517] + [0] * 8]


def test_truncation_keeps_the_end_token(tiny_tokenizer):
    ids = tiny_tokenizer("hello hell oh hello", context_length=5)
    assert ids.tolist() == [[516, 515, 514, 331, 517]]
    assert tiny_tokenizer(["hello"] * 2, context_length=3).tolist() == [[516, 515, 517]] * 2


def test_unreadable_vocabulary_is_a_clear_error(tmp_path):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    path.write_text("not gzip")
    with pytest.raises(BackboneError, match="not a readable gzip"):
        ClipTokenizer(path)


def test_missing_or_altered_vocabulary_names_file_folder_and_url(tmp_path):
    with pytest.raises(BackboneError, match=f"bpe_simple_vocab_16e6.txt.gz not found in {tmp_path}.*open_clip"):
        load_tokenizer(tmp_path)
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wt") as f:
        f.write("#version: 0.2\nh e\n")
    with pytest.raises(BackboneError, match="hash does not match"):
        load_tokenizer(tmp_path)
