# tests/test_afclip.py
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from defectvad.backbones.clip import convert_tinyclip
from defectvad.backbones.registry import get_backbone
from defectvad.errors import ConfigError
from defectvad.models.afclip.anomaly_map import AnomalyMapGenerator
from defectvad.models.afclip.loss import AfClipLoss, focal_loss, patch_alignment_loss
from defectvad.models.afclip.torch_model import AfClipModel, gaussian_kernel
from defectvad.models.afclip.trainer import AfClipTrainer

# a CLIP of 32x32 inputs (2x2 patches of 16); 48x48 inputs resize its position embeddings to 3x3
TINY = dict(embed_dim=16, image_size=32, vision_width=32, vision_layers=2, text_width=32, text_heads=2, text_layers=1,
            vocab_size=514, vision_head_width=16)
SYNTHETIC = {"_target_": "defectvad.data.synthetic.SyntheticDataset", "root": "unused", "category": "weave"}


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    trainer = AfClipTrainer(backbone="clip_vit_b16_plus_240", train_dataset=SYNTHETIC, backbone_dir=tmp_path,
                            clip_architecture=TINY, feature_layers=[1, 2])
    with torch.no_grad():
        trainer.model.state_prompt_embedding.normal_(std=0.5)
        for name, tensor in trainer.model.clip.visual.named_parameters():
            if name.startswith("ln_"):
                tensor.add_(0.2 * torch.randn_like(tensor))
    return trainer.model.eval()


def test_aggregation_is_a_gaussian_weighted_neighbourhood_with_zeros_outside(model):
    torch.manual_seed(1)
    grid, width = (3, 4), 5
    tokens = torch.randn(2, 1 + 12, width)
    smoothed = model.aggregate_neighbor(tokens, grid, 5)
    kernel = gaussian_kernel(5, 4.0)
    assert torch.equal(smoothed[:, 0], tokens[:, 0])
    patches = tokens[:, 1:].reshape(2, 3, 4, width)
    for row in range(3):
        for col in range(4):
            expected = sum(kernel[dr + 2, dc + 2] * patches[:, row + dr, col + dc]
                           for dr in range(-2, 3) for dc in range(-2, 3)
                           if 0 <= row + dr < 3 and 0 <= col + dc < 4)
            torch.testing.assert_close(smoothed[:, 1 + row * 4 + col], expected, rtol=1e-5, atol=1e-6)
    # sigma 4 on a 3x3 neighbourhood: nearly uniform, the centre a little heavier
    assert gaussian_kernel(3, 4.0)[1, 1] == pytest.approx(1 / (1 + 4 * math.exp(-1 / 32) + 4 * math.exp(-1 / 16)))
    assert torch.equal(model.aggregate_neighbor(tokens, grid, 1), tokens)
    assert len(model.aggregate_neighbors([tokens, tokens], grid)) == 6


def test_adaptor_is_eight_head_attention_without_residual(model):
    torch.manual_seed(2)
    x = torch.randn(2, 7, 32)
    block = model.adaptor.attention
    attn = block.attn
    y = F.layer_norm(x, (32,), block.norm.weight, block.norm.bias)
    q, k, v = y @ attn.to_q.weight.T, y @ attn.to_k.weight.T, y @ attn.to_v.weight.T
    heads = []
    for h in range(8):
        part = slice(64 * h, 64 * (h + 1))
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 8.0, dim=-1)
        heads.append(weights @ v[..., part])
    expected = torch.cat(heads, dim=-1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(model.adaptor(x), expected, rtol=1e-4, atol=1e-5)
    names = {name for name, _ in model.named_parameters() if not name.startswith("clip.")}
    assert names == {"state_prompt_embedding", "adaptor.attention.norm.weight", "adaptor.attention.norm.bias",
                     "adaptor.attention.attn.to_q.weight", "adaptor.attention.attn.to_k.weight",
                     "adaptor.attention.attn.to_v.weight", "adaptor.attention.attn.to_out.0.weight",
                     "adaptor.attention.attn.to_out.0.bias"}
    assert model.state_prompt_embedding.shape == (1, 12, 32)


def test_scores_are_the_anomalous_state_probability_summed_over_layers_and_scales(model):
    torch.manual_seed(3)
    images = torch.randn(2, 3, 48, 48)
    text = F.normalize(model.encode_state_prompt(), dim=-1)
    layer_tokens, grid = model.encode_image(images, (1, 2))
    assert grid == (3, 3) and sorted(layer_tokens) == [1, 2]
    visual = model.clip.visual
    logits = 0
    for tokens in layer_tokens.values():
        for size in (1, 3, 5):
            adapted = visual.ln_post(model.adaptor(model.aggregate_neighbor(tokens, grid, size))) @ visual.proj
            logits = logits + F.normalize(adapted, dim=-1) @ text.T / 0.07
    prob = logits.softmax(dim=-1)[..., 1]
    with torch.no_grad():
        score, patch_map, tokens = model.detect_forward_seg(images)
        output = model(images)
    assert len(tokens) == 6
    torch.testing.assert_close(score, prob[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch_map, prob[:, 1:].reshape(2, 1, 3, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.pred_score, prob[:, 0], rtol=1e-5, atol=1e-6)
    assert output.anomaly_map.shape == (2, 1, 48, 48)


def test_state_prompts_are_encoded_once_and_again_after_training(model, monkeypatch):
    calls = []
    encode = model.encode_state_prompt
    monkeypatch.setattr(model, "encode_state_prompt", lambda: calls.append(1) or encode())
    images = torch.randn(1, 3, 32, 32)
    model(images)
    model(images)
    assert len(calls) == 1 and model.text_features.shape == (2, 16)
    model.train()
    model(images)
    model(images)
    assert len(calls) == 3
    model.eval()
    model.clear_text_features()
    model(images)
    assert len(calls) == 4


def test_memory_bank_of_the_image_itself_leaves_alpha_times_the_zero_shot_score(model):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 32, 32)
    zero_shot = model(images)
    model.collect(images[:1])
    model.fit()
    assert model.memorybank.shape == (6, 4, 32)
    few_shot = model(images)
    # the first image is its own reference: distance 0 everywhere
    torch.testing.assert_close(few_shot.pred_score[0], 0.1 * zero_shot.pred_score[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(few_shot.anomaly_map[0], 0.1 * zero_shot.anomaly_map[0], rtol=1e-4, atol=1e-5)
    # the second: half the cosine distance to its nearest reference patch, averaged over the 6 smoothed layers
    layer_tokens, grid = model.encode_image(images, (1, 2))
    distances = 0
    for tokens in layer_tokens.values():
        for size in (1, 3, 5):
            smoothed = F.normalize(model.aggregate_neighbor(tokens, grid, size)[:, 1:], dim=-1)
            distances = distances + (1 - smoothed[1] @ smoothed[0].T).min(dim=1).values / 2
    distances = distances / 6
    torch.testing.assert_close(few_shot.pred_score[1], distances.max() + 0.1 * zero_shot.pred_score[1],
                               rtol=1e-4, atol=1e-5)


def test_focal_l1_and_alignment_losses_by_hand():
    p, t = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0])
    by_hand = (-math.log(0.9) * 0.1 ** 4 - math.log(0.8) * 0.2 ** 4 - math.log(0.4) * 0.6 ** 4) / 3
    assert focal_loss(p, t).item() == pytest.approx(by_hand, rel=1e-5)
    # three anomalous patches along the axes, one normal patch on the diagonal: the same-state pairs (10, with
    # the 4 self-pairs) average 0.4, the 6 mixed pairs 1/sqrt(3)
    tokens = torch.tensor([[[9.0, 9, 9], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]])
    masks = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert patch_alignment_loss([tokens], masks).item() == pytest.approx(1 / math.sqrt(3) - 0.4, rel=1e-6)
    # averaged over the layers, each term clamped at 0 (the normal patch far from the anomalous ones)
    far = torch.tensor([[[9.0, 9, 9], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]])
    assert patch_alignment_loss([tokens, far], masks).item() == pytest.approx((1 / math.sqrt(3) - 0.4) / 2,
                                                                              rel=1e-6)
    # the class token (first) takes no part
    moved = tokens.clone()
    moved[0, 0] = torch.tensor([-5.0, 2, 0])
    assert patch_alignment_loss([moved], masks).item() == patch_alignment_loss([tokens], masks).item()
    # no anomalous patch (the authors' mean over no pairs counts as 0) or no normal one (their early return)
    assert patch_alignment_loss([tokens], torch.zeros(1, 1, 2, 2)).item() == 0.0
    assert patch_alignment_loss([tokens], torch.ones(1, 1, 2, 2)).item() == 0.0


def test_total_loss_and_the_authors_gradient():
    torch.manual_seed(5)
    pred_map = torch.rand(2, 1, 2, 2).clamp(0.05, 0.95).requires_grad_(True)
    pred_score = torch.tensor([0.3, 0.7])
    tokens = [torch.randn(2, 5, 3)]
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 1, 8, 8)
    masks[1, :, :4, :4] = 1
    target = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0]]).reshape(2, 1, 2, 2)
    expected = (focal_loss(pred_score, labels) + 3 * (focal_loss(pred_map, target) + F.l1_loss(pred_map, target))
                + 2 * patch_alignment_loss(tokens, target))
    for authors in (True, False):
        loss = AfClipLoss(3.0, 2.0, 4.0, authors)(pred_score, pred_map, tokens, labels, masks)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, pred_map)
        x, t = pred_map.detach(), target
        seen = torch.where(t == 0, -1.0, t) if authors else t
        p_t = x * t + (1 - x) * (1 - t)
        ce = -(t * torch.log(x) + (1 - t) * torch.log(1 - x))
        by_hand = ((x - seen) / (x * (1 - x)) * (1 - p_t) ** 4 - ce * 4 * (1 - p_t) ** 3 * (seen - (1 - t))
                   + torch.sign(x - seen)) * 3 / x.numel()
        torch.testing.assert_close(grad, by_hand, rtol=1e-4, atol=1e-6)


def test_the_map_is_upsampled_then_smoothed_as_scipy_does():
    torch.manual_seed(6)
    patch_map = torch.rand(2, 1, 3, 3)
    output = AnomalyMapGenerator(4.0)(patch_map, (10, 40))
    upsampled = F.interpolate(patch_map, size=(10, 40), mode="bilinear").numpy()
    expected = np.stack([gaussian_filter(m, sigma=4) for m in upsampled])
    np.testing.assert_allclose(output.numpy(), expected, rtol=1e-5, atol=1e-6)


def tinyclip_parameters(width, layers, text_width, text_layers, patch=16, image=224, embed=512):
    def blocks(w, n):
        return n * (3 * w * w + 3 * w + w * w + w + 4 * w + w * 4 * w + 4 * w + 4 * w * w + w)

    visual = 3 * width * patch * patch + width + ((image // patch) ** 2 + 1) * width + 4 * width
    visual += blocks(width, layers) + width * embed
    text = 49408 * text_width + 77 * text_width + blocks(text_width, text_layers) + 2 * text_width
    return visual + text + text_width * embed + 1


@pytest.mark.parametrize("name, width, layers, text_width, text_layers, heads, stages", [
    ("tinyclip_vit_8m_16_text_3m", 256, 10, 256, 3, 4, (1, 4, 6, 9)),
    ("tinyclip_vit_39m_16_text_19m", 512, 12, 512, 6, 8, (2, 5, 8, 11)),
])
def test_tinyclip_backbones_build_with_their_published_sizes(name, width, layers, text_width, text_layers, heads,
                                                              stages):
    spec = get_backbone(name)
    with torch.device("meta"):
        clip = spec.build()
    assert spec.family == "clip" and spec.tower == "visual" and spec.image_size == 224
    assert sum(p.numel() for p in clip.parameters()) == tinyclip_parameters(width, layers, text_width, text_layers)
    assert clip.visual.transformer.resblocks[0].attn.num_heads == heads
    assert clip.transformer.resblocks[0].attn.num_heads == heads
    # TinyCLIP's configs set no quick_gelu: open_clip's nn.GELU
    assert type(clip.visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    assert spec.stages == [f"transformer.resblocks.{i}" for i in stages]
    assert spec.files[0]["file"].startswith("TinyCLIP-ViT-") and spec.files[0]["file"].endswith("-YFCC15M.pt")
    # the checkpoint's layout (towers under _image_encoder / _text_encoder / _logit_scale, DDP's "module.")
    state = clip.state_dict()
    wrapped = {}
    for key, value in state.items():
        tower = "_image_encoder" if key.startswith("visual.") else "_logit_scale" if key == "logit_scale" else "_text_encoder"
        wrapped[f"module.{tower}.module.{key}"] = value
    assert convert_tinyclip(wrapped).keys() == state.keys()
    assert convert_tinyclip({"_image_encoder.visual.proj": 1, "_logit_scale.logit_scale": 2}) == {"visual.proj": 1,
                                                                                                  "logit_scale": 2}


def test_configuration_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="model.train_dataset"):
        AfClipTrainer(train_dataset=None)
    visa = {"_target_": "defectvad.data.visa.VisaDataset", "root": "x", "category": "weave"}
    with pytest.raises(ConfigError, match="not a VisA category"):
        AfClipTrainer(train_dataset=visa)
    with pytest.raises(ConfigError, match="block numbers from 1 to 2"):
        AfClipTrainer(backbone="clip_vit_b16_plus_240", train_dataset=SYNTHETIC, backbone_dir=tmp_path,
                      clip_architecture=TINY, feature_layers=[1, 3])
    with pytest.raises(ConfigError, match="CLIP backbone"):
        AfClipTrainer(backbone="resnet18", train_dataset=SYNTHETIC, backbone_dir=tmp_path)


def test_fit_trains_only_prompt_and_adapter_then_keeps_prompts_and_references(tmp_path, monkeypatch):
    torch.manual_seed(7)
    trainer = AfClipTrainer(backbone="clip_vit_b16_plus_240", k_shot=2, train_dataset=SYNTHETIC,
                            backbone_dir=tmp_path, clip_architecture=TINY, feature_layers=[1, 2])
    trainer.configure_engine(max_epochs=2)
    masks = torch.zeros(4, 1, 32, 32)
    masks[1, :, :16, :16] = 1
    labelled = [{"image": torch.randn(3, 32, 32), "label": int(i == 1), "mask": masks[i]} for i in range(4)]
    references = [{"image": torch.randn(3, 32, 32)} for _ in range(2)]
    monkeypatch.setattr(trainer, "create_train_loader", lambda: torch.utils.data.DataLoader(labelled, batch_size=2))
    clip_before = {k: v.clone() for k, v in trainer.model.clip.state_dict().items()}
    prompt_before = trainer.model.state_prompt_embedding.detach().clone()
    trainer.fit(torch.utils.data.DataLoader(references, batch_size=1))
    assert trainer.current_epoch == 2 and trainer.global_step == 4 and len(trainer.train_losses) == 2
    assert all(torch.equal(v, trainer.model.clip.state_dict()[k]) for k, v in clip_before.items())
    assert not torch.equal(prompt_before, trainer.model.state_prompt_embedding)
    assert not trainer.model.training
    torch.testing.assert_close(trainer.model.text_features, F.normalize(trainer.model.encode_state_prompt(), dim=-1))
    # 2 blocks x 3 scales; 2 images x 4 patches; CLIP width 32
    assert trainer.model.memorybank.shape == (6, 8, 32)
