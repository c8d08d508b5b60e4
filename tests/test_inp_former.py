# tests/test_inp_former.py
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.backbones.registry import get_backbone
from defectvad.backbones.vit import dinov2_reg4
from defectvad.components.dinov2_reconstruction import convert_anomalib_state_dict
from defectvad.errors import ConfigError
from defectvad.models.inp_former.layers import AggregationBlock, PrototypeBlock
from defectvad.models.inp_former.loss import GlobalCosineHmAdaptiveLoss, calculate_inp_loss
from defectvad.models.inp_former.torch_model import InpFormerModel
from defectvad.models.inp_former.trainer import InpFormerTrainer

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEADS = 32, 2


@pytest.fixture(autouse=True)
def tiny_dinov2(single_thread, monkeypatch):
    # dinov2_vits14_reg4's layout (12 blocks, 4 registers, patch 14) at width 32
    monkeypatch.setattr(get_backbone("dinov2_vits14_reg4"), "build",
                        partial(dinov2_reg4, img_size=28, embed_dim=WIDTH, depth=12, num_heads=HEADS))
    torch.manual_seed(0)


def cosine_distance(a, b, dim):
    return 1 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim))


def layer_norm(x):
    # the blocks' LayerNorm at its initial weights: eps 1e-8
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-8).sqrt()


def linear(layer, x):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def mlp(module, x):
    return linear(module.fc2, F.gelu(linear(module.fc1, x)))


def heads(x):
    # (B, N, C) -> per head (B, N, C / heads)
    return x.chunk(HEADS, dim=-1)


def randomize(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.2 * torch.randn_like(parameter))


def test_inp_loss_is_the_mean_distance_to_the_nearest_prototype():
    features, prototypes = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    by_hand = np.zeros((2, 5))
    for b in range(2):
        for n in range(5):
            by_hand[b, n] = min(float(cosine_distance(features[b, n], prototypes[b, m], 0)) for m in range(3))
    assert calculate_inp_loss(features, prototypes).item() == pytest.approx(by_hand.mean(), rel=1e-5)
    # a token equal to a prototype (up to scale) is at distance 0
    features[:, 0] = 3 * prototypes[:, 1]
    assert calculate_inp_loss(features, prototypes).item() < by_hand.mean()


def test_soft_mining_loss_value_and_gradients():
    encoder = [torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)]
    decoder = [(e + 0.8 * torch.randn_like(e)).requires_grad_() for e in encoder]
    loss = GlobalCosineHmAdaptiveLoss()(encoder, decoder, torch.tensor(0.5))
    loss.backward()
    # value: per group 1 - cosine of each image's whole flattened map, averaged, plus 0.2 times the INP loss
    flat = [cosine_distance(e.reshape(2, -1), d.detach().reshape(2, -1), 1).mean() for e, d in zip(encoder, decoder)]
    assert loss.item() == pytest.approx(sum(flat).item() / 2 + 0.1, rel=1e-6)
    # gradients: the plain loss's, times (point distance / its mean) ** 3
    for e, d in zip(encoder, decoder):
        plain = d.detach().clone().requires_grad_()
        (cosine_distance(e.reshape(2, -1), plain.reshape(2, -1), 1).mean() / 2).backward()
        distance = cosine_distance(e, d.detach(), 1).unsqueeze(1)
        torch.testing.assert_close(d.grad, plain.grad * (distance / distance.mean()) ** 3, rtol=1e-5, atol=1e-8)


def test_aggregation_block_is_softmax_cross_attention_with_residuals():
    block = AggregationBlock(WIDTH, HEADS)
    randomize(block)
    with torch.no_grad():
        block.norm1.weight.fill_(1), block.norm1.bias.zero_(), block.norm2.weight.fill_(1), block.norm2.bias.zero_()
    queries, tokens = torch.randn(2, 3, WIDTH), torch.randn(2, 7, WIDTH)
    q = linear(block.attn.q, layer_norm(queries))
    k, v = linear(block.attn.kv, layer_norm(tokens)).split(WIDTH, dim=-1)
    attended = torch.cat([torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(WIDTH // HEADS), dim=-1) @ vh
                          for qh, kh, vh in zip(heads(q), heads(k), heads(v))], dim=-1)
    x = queries + linear(block.attn.proj, attended)
    expected = x + mlp(block.mlp, layer_norm(x))
    torch.testing.assert_close(block(queries, tokens), expected, rtol=1e-4, atol=1e-5)


def test_prototype_block_reads_only_the_prototypes_through_relu_cosine_attention():
    block = PrototypeBlock(WIDTH, HEADS)
    randomize(block)
    with torch.no_grad():
        block.norm1.weight.fill_(1), block.norm1.bias.zero_(), block.norm2.weight.fill_(1), block.norm2.bias.zero_()
        block.attn.learn_scale.copy_(torch.tensor([2.0, 0.5]).view(2, 1, 1))
    x, prototypes = torch.randn(2, 7, WIDTH), torch.randn(2, 3, WIDTH)
    q = linear(block.attn.q, layer_norm(x))
    k, v = linear(block.attn.kv, layer_norm(prototypes)).split(WIDTH, dim=-1)
    parts = []
    for scale, qh, kh, vh in zip((2.0, 0.5), heads(q), heads(k), heads(v)):
        cosine = F.normalize(qh, dim=-1) @ F.normalize(kh, dim=-1).transpose(1, 2)
        parts.append((scale * cosine).clamp_min(0) @ vh)
    # no residual around the attention: the input itself does not reach the output
    y = linear(block.attn.proj, torch.cat(parts, dim=-1))
    torch.testing.assert_close(block(x, prototypes), y + mlp(block.mlp, layer_norm(y)), rtol=1e-4, atol=1e-5)


def test_inp_extraction_gives_inp_num_prototypes_per_image():
    model = InpFormerModel(backbone="dinov2_vits14_reg4", inp_num=5, remove_class_token=True).eval()
    images = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        grid, features = model.encode(images)
        prototypes = model.extract_prototypes(features[0])
        alone = model.extract_prototypes(features[0][1:])
    # class and register tokens removed: the 2x3 patches of blocks 2..9
    assert grid == (2, 3) and len(features) == 8 and features[0].shape == (2, 6, WIDTH)
    assert prototypes.shape == (2, 5, WIDTH)
    # each image's prototypes come from its own tokens only, out of the shared queries through the block
    torch.testing.assert_close(prototypes[1:], alone)
    expected = model.aggregation[0](model.prototype_token[0].unsqueeze(0), features[0][1:])
    torch.testing.assert_close(prototypes[1:], expected.detach())
    assert not torch.allclose(prototypes[0], prototypes[1])


def test_map_and_score_from_known_features(monkeypatch):
    model = InpFormerModel(backbone="dinov2_vits14_reg4").eval()
    encoder = [torch.randn(2, WIDTH, 20, 20) for _ in range(2)]
    decoder = [e + torch.randn_like(e) * torch.linspace(0.1, 2, 20) for e in encoder]
    monkeypatch.setattr(model, "get_encoder_decoder_inploss", lambda images: (encoder, decoder, None))
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 20, 20))
    # features at the input size: the map is the mean cosine distance, blurred (5x5, sigma 4, reflected borders)
    distance = ((cosine_distance(encoder[0], decoder[0], 1) + cosine_distance(encoder[1], decoder[1], 1)) / 2).numpy()
    taps = np.exp(-np.arange(-2, 3) ** 2 / 32.0)
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    padded = np.pad(distance, ((0, 0), (2, 2), (2, 2)), mode="reflect")
    blurred = np.zeros_like(distance)
    for i in range(5):
        for j in range(5):
            blurred += kernel[i, j] * padded[:, i:i + 20, j:j + 20]
    np.testing.assert_allclose(out.anomaly_map[:, 0].numpy(), blurred, rtol=1e-5, atol=1e-6)
    # the score: the mean of the 4 largest of 400 pixels (1%)
    expected = np.sort(blurred.reshape(2, -1), axis=1)[:, -4:].mean(1)
    np.testing.assert_allclose(out.pred_score.numpy(), expected, rtol=1e-5)


def test_model_runs_with_and_without_prefix_tokens():
    images = torch.randn(2, 3, 28, 28)
    for remove_class_token in (True, False):
        model = InpFormerModel(backbone="dinov2_vits14_reg4", remove_class_token=remove_class_token).eval()
        with torch.no_grad():
            encoder_maps, decoder_maps, inp_loss = model.get_encoder_decoder_inploss(images)
            out = model(images)
            tokens = model.encoder.tokens(images)
        assert inp_loss is None and out.anomaly_map.shape == (2, 1, 28, 28) and out.pred_score.shape == (2,)
        # the encoder's first group: the mean of blocks 2..5's patch tokens, on the 2x2 grid
        patches = torch.stack([tokens[f"blocks.{i}"]["patches"] for i in (2, 3, 4, 5)]).mean(0)
        torch.testing.assert_close(encoder_maps[0], patches.transpose(1, 2).reshape(2, WIDTH, 2, 2))
        assert decoder_maps[1].shape == (2, WIDTH, 2, 2)
    model.train()
    loss = model(images)
    assert loss.ndim == 0 and math.isfinite(loss.item())


def test_state_dict_has_anomalibs_names_and_loads_strictly():
    model = InpFormerModel(backbone="dinov2_vits14_reg4")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes["prototype_token.0"] == (6, WIDTH)
    assert shapes["aggregation.0.attn.q.weight"] == (WIDTH, WIDTH)
    assert shapes["aggregation.0.attn.kv.weight"] == (2 * WIDTH, WIDTH)
    assert shapes["decoder.7.attn.learn_scale"] == (HEADS, 1, 1)
    assert shapes["bottleneck.0.fc1.bias"] == (4 * WIDTH,)
    assert shapes["gaussian_blur.kernel"] == (1, 1, 5, 5)
    assert "decoder.0.mlp.fc1.bias" not in shapes and "decoder.8.norm1.weight" not in shapes
    assert "encoder.feature_extractor.blocks.9.attn.qkv.weight" in shapes
    assert "encoder.feature_extractor.blocks.10.attn.qkv.weight" not in shapes
    # anomalib's Lightning keys, with the encoder's unused tail (blocks 10, 11 and the final norm)
    state = {f"model.{key}": value + 1 for key, value in model.state_dict().items()}
    state["model.encoder.feature_extractor.blocks.11.norm1.weight"] = torch.ones(WIDTH)
    state["model.encoder.feature_extractor.norm.weight"] = torch.ones(WIDTH)
    model.load_state_dict(convert_anomalib_state_dict(state, model), strict=True)
    torch.testing.assert_close(model.prototype_token[0], state["model.prototype_token.0"])


def test_trainer_learns_prototypes_extractor_bottleneck_and_decoder():
    trainer = InpFormerTrainer(backbone="dinov2_vits14_reg4").configure_engine(max_epochs=1, max_steps=None)
    model = trainer.model
    assert model.remove_class_token and trainer.eps == 1e-10 and trainer.lr == 1e-3 and trainer.final_value == 1e-4
    # initialisation: truncated normal in [-0.03, 0.03]; the prototype queries stay standard normal
    assert model.aggregation[0].attn.kv.weight.abs().max() <= 0.03
    assert 0.7 < model.prototype_token[0].std() < 1.3
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    learnt = {"prototype_token.0", "aggregation.0.attn.q.weight", "bottleneck.0.fc1.weight",
              "decoder.0.attn.learn_scale", "decoder.7.mlp.fc2.weight"}
    before = {k: v.clone() for k, v in model.state_dict().items() if k in learnt}
    loader = DataLoader([{"image": torch.randn(3, 28, 28)} for _ in range(4)], batch_size=2)
    # past the warm-up, so that the second step moves the weights (the first one's learning rate is 0)
    trainer.warmup_iters = 1
    trainer.fit(loader)
    assert trainer.global_step == 2 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in learnt)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="INP-Former's encoder is a DINOv2 ViT.*dinov2_vits14, "):
        InpFormerModel(backbone="resnet18")
    with pytest.raises(ConfigError, match="fuse_layer_decoder"):
        InpFormerModel(backbone="dinov2_vits14_reg4", fuse_layer_decoder=[[0, 8]])
    with pytest.raises(ConfigError, match="inp_num"):
        InpFormerModel(backbone="dinov2_vits14_reg4", inp_num=0)


def test_configs_select_anomalibs_setup():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("config", overrides=["model=inp_former"]).backbone.name == "dinov2_vitb14_reg4"
        preset = compose("config", overrides=["experiment=inp_former"])
    assert list(preset.transform.image_size) == [448, 448] and list(preset.transform.center_crop) == [392, 392]
    assert preset.trainer.max_epochs == 200 and preset.model.inp_num == 6 and preset.model.remove_class_token
