# tests/test_dinomaly.py
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.backbones.registry import get_backbone
from defectvad.backbones.vit import dinov2_reg4
from defectvad.components.dinov2_reconstruction import convert_anomalib_state_dict
from defectvad.components.stable_adamw import StableAdamW
from defectvad.components.warm_cosine_scheduler import WarmCosineScheduler
from defectvad.errors import ConfigError
from defectvad.models.dinomaly.anomaly_map import calculate_anomaly_maps
from defectvad.models.dinomaly.loss import CosineHardMiningLoss
from defectvad.models.dinomaly.torch_model import DinomalyModel
from defectvad.models.dinomaly.trainer import DinomalyTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_dinov2(single_thread, monkeypatch):
    # dinov2_vits14_reg4's layout (12 blocks, 4 registers, patch 14) at width 32
    monkeypatch.setattr(get_backbone("dinov2_vits14_reg4"), "build",
                        partial(dinov2_reg4, img_size=28, embed_dim=32, depth=12, num_heads=2))
    torch.manual_seed(0)


def cosine_distance(a, b, dim):
    return 1 - (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim))


def adam_reference(param, grads, lr, betas, eps, weight_decay, amsgrad, clip):
    # the formula in float64: decoupled decay, bias-corrected moments, the step divided by max(1, RMS(g / d) / clip)
    p, m, v, v_max = param.double().clone(), 0.0, 0.0, torch.zeros_like(param, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        v_max = torch.maximum(v_max, v)
        second = v_max if amsgrad else v
        d = (second / (1 - betas[1] ** t)).sqrt() + eps
        rms = math.sqrt(((g / d) ** 2).mean().item())
        p = p - lr / (1 - betas[0] ** t) / max(1.0, rms / clip) * m / d
    return p


@pytest.mark.parametrize("amsgrad, clip", [(True, 1.0), (False, 1.0), (True, 0.5)])
def test_stable_adamw_steps_follow_the_formula(amsgrad, clip):
    start = torch.randn(4, 3)
    # a large then a small gradient: AMSGrad keeps the first second moment, and the RMS clip acts when clip < 1
    grads = [torch.randn(4, 3) * 3, torch.randn(4, 3) * 0.1, torch.randn(4, 3)]
    param = torch.nn.Parameter(start.clone())
    optimizer = StableAdamW([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                            clip_threshold=clip)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    expected = adam_reference(start, grads, 0.01, (0.9, 0.999), 1e-8, 0.1, amsgrad, clip)
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(param.detach(), start)


def test_stable_adamw_first_step_is_the_sign_times_lr_when_unclipped():
    param = torch.nn.Parameter(torch.zeros(5))
    optimizer = StableAdamW([param], lr=0.1, weight_decay=0.0, amsgrad=True, clip_threshold=10.0)
    param.grad = torch.tensor([2.0, -3.0, 0.5, -0.1, 4.0])
    optimizer.step()
    torch.testing.assert_close(param.detach(), -0.1 * torch.sign(param.grad), rtol=1e-6, atol=1e-8)


def test_warm_cosine_scheduler_values():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmCosineScheduler(optimizer, base_value=2e-3, final_value=2e-4, total_iters=5000, warmup_iters=100)
    seen = {}
    for step in range(5003):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.0
    assert seen[50] == pytest.approx(2e-3 * 50 / 99)
    assert seen[99] == pytest.approx(2e-3)
    assert seen[100] == pytest.approx(2e-3)
    # halfway through the cosine part: the mean of both ends
    assert seen[100 + 2450] == pytest.approx(1.1e-3)
    assert seen[4999] == pytest.approx(2e-4 + 0.9e-3 * (1 + math.cos(math.pi * 4899 / 4900)))
    assert seen[5000] == seen[5002] == 2e-4


def test_warm_cosine_scheduler_shorter_than_its_warm_up_only_warms_up():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmCosineScheduler(optimizer, base_value=1.0, final_value=0.1, total_iters=3, warmup_iters=11)
    values = []
    for _ in range(4):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert values == pytest.approx([0.0, 0.1, 0.2, 0.1])


@pytest.mark.parametrize("global_step, p", [(0, 0.0), (500, 0.45), (2000, 0.9)])
def test_hard_mining_loss_value_and_gradients(global_step, p):
    encoder = [torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)]
    decoder = [(e + 0.8 * torch.randn_like(e)).requires_grad_() for e in encoder]
    loss = CosineHardMiningLoss()(encoder, decoder, global_step)
    loss.backward()
    assert CosineHardMiningLoss().update_p(global_step) == pytest.approx(p)

    # value: per group, 1 - cosine of each image's whole flattened map, averaged over images and groups
    flat = [cosine_distance(e.reshape(2, -1), d.detach().reshape(2, -1), 1).mean() for e, d in zip(encoder, decoder)]
    assert loss.item() == pytest.approx(sum(flat).item() / 2, rel=1e-6)
    # gradients: the plain loss's, times 0.1 on points closer than the hardest (1 - p) share
    for e, d in zip(encoder, decoder):
        plain = d.detach().clone().requires_grad_()
        (cosine_distance(e.reshape(2, -1), plain.reshape(2, -1), 1).mean() / 2).backward()
        distance = cosine_distance(e, d.detach(), 1)
        hardest = max(1, int(distance.numel() * (1 - p)))
        threshold = distance.flatten().sort(descending=True).values[hardest - 1]
        easy = (distance < threshold).unsqueeze(1)
        assert int(easy.sum()) == (distance.numel() - hardest if p else 0)
        torch.testing.assert_close(d.grad, plain.grad * torch.where(easy, 0.1, 1.0), rtol=1e-5, atol=1e-8)


def test_anomaly_map_is_the_mean_cosine_distance_over_groups():
    encoder = [torch.randn(2, 5, 3, 4) for _ in range(2)]
    decoder = [torch.randn(2, 5, 3, 4) for _ in range(2)]
    # at the grid size the corner-aligned interpolation is the identity
    anomaly_map, groups = calculate_anomaly_maps(encoder, decoder, (3, 4))
    by_hand = [cosine_distance(e, d, 1) for e, d in zip(encoder, decoder)]
    torch.testing.assert_close(anomaly_map[:, 0], (by_hand[0] + by_hand[1]) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(groups[1][:, 0], by_hand[1], rtol=1e-5, atol=1e-6)
    upsampled, _ = calculate_anomaly_maps(encoder, decoder, 9)
    assert upsampled.shape == (2, 1, 9, 9)
    # corners aligned: the corner pixels are the corner patches
    torch.testing.assert_close(upsampled[:, 0, ::8, ::8], anomaly_map[:, 0, ::2, ::3], rtol=1e-5, atol=1e-6)


def test_model_fuses_its_target_blocks_and_scores_the_blurred_top_percent():
    model = DinomalyModel(backbone="dinov2_vits14_reg4", decoder_depth=8).eval()
    assert model.target_layers == [2, 3, 4, 5, 6, 7, 8, 9]
    assert model.num_register_tokens == 4 and len(model.encoder.feature_extractor.blocks) == 10
    images = torch.randn(2, 3, 28, 45)
    with torch.no_grad():
        encoder_maps, decoder_maps = model.get_encoder_decoder_outputs(images)
        tokens = model.encoder.tokens(images)
        out = model(images)
    # the encoder's first group: the mean of blocks 2..5's patch tokens, on the 2x3 patch grid
    patches = torch.stack([tokens[f"blocks.{i}"]["patches"] for i in (2, 3, 4, 5)]).mean(0)
    torch.testing.assert_close(encoder_maps[0], patches.transpose(1, 2).reshape(2, 32, 2, 3), rtol=1e-5, atol=1e-6)
    assert decoder_maps[1].shape == (2, 32, 2, 3)

    by_hand = sum(cosine_distance(e, d, 1) for e, d in zip(encoder_maps, decoder_maps)) / 2
    expected = F.interpolate(by_hand.unsqueeze(1), size=(28, 45), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    # the score: the map at 256x256, blurred, the mean of its 655 largest values, within the map's range
    assert out.pred_score.shape == (2,)
    assert bool(((out.pred_score <= by_hand.flatten(1).amax(1) + 1e-6)
                 & (out.pred_score >= by_hand.flatten(1).amin(1) - 1e-6)).all())


def test_model_score_of_a_flat_map_is_its_value():
    model = DinomalyModel(backbone="dinov2_vits14_reg4").eval()
    flat = torch.full((1, 1, 28, 28), 0.25)
    blurred = model.gaussian_blur(F.interpolate(flat, size=256, mode="bilinear", align_corners=False))
    assert torch.allclose(blurred, torch.full_like(blurred, 0.25))


def image_loader(count):
    return DataLoader([{"image": torch.randn(3, 28, 28)} for _ in range(count)], batch_size=2)


def test_trainer_trains_only_bottleneck_and_decoder_on_its_schedule():
    trainer = DinomalyTrainer(backbone="dinov2_vits14_reg4").configure_engine(max_epochs=3, max_steps=None)
    loader = image_loader(4)
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    decoder_before = [p.detach().clone() for p in trainer.model.decoder.parameters()]
    trainer.fit(loader)
    # 3 epochs of 2 batches: the schedule spans 6 steps (all inside the 100 warm-up steps) and ends at final_value
    assert trainer.global_step == 6 and trainer.step_scheduler.total_iters == 6
    assert trainer.step_scheduler.last_epoch == 6 and trainer.optimizer.param_groups[0]["lr"] == 2e-4
    assert all(torch.equal(v, encoder_before[k]) for k, v in trainer.model.encoder.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.decoder.parameters(), decoder_before))
    assert trainer.model.loss_fn.p == pytest.approx(0.9 * 5 / 1000)
    # the initialisation: truncated normal in [-0.03, 0.03], LayerNorms as identity
    fresh = DinomalyTrainer(backbone="dinov2_vits14_reg4").model
    weight = fresh.decoder[0].mlp.fc1.weight
    assert weight.abs().max() <= 0.03 and 0.005 < weight.std() < 0.015
    assert torch.equal(fresh.decoder[0].norm1.weight, torch.ones(32))


def test_trainer_steps_its_schedule_per_epoch_as_anomalib_on_request():
    trainer = DinomalyTrainer(backbone="dinov2_vits14_reg4", scheduler_interval="epoch")
    trainer.configure_engine(max_epochs=2)
    trainer.fit(image_loader(6))
    assert trainer.step_scheduler is None and trainer.scheduler.last_epoch == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 2 / 99)


def test_a_cnn_backbone_or_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="dinov2_vitb14_reg4.*dinov2_vitl14_reg4|dinov2_vits14, "):
        DinomalyModel(backbone="resnet18")
    with pytest.raises(ConfigError, match="fuse_layer_decoder"):
        DinomalyModel(backbone="dinov2_vits14_reg4", decoder_depth=4)
    with pytest.raises(ConfigError, match="remove_class_token"):
        DinomalyModel(backbone="dinov2_vits14_reg4", remove_class_token=True, use_context_recentering=True)


def test_anomalib_state_dict_loads_strictly():
    model = DinomalyModel(backbone="dinov2_vits14_reg4")
    # anomalib's Lightning keys, with the encoder's unused tail (blocks 10, 11 and the final norm)
    state = {f"model.{key}": value + 1 for key, value in model.state_dict().items()}
    state["model.encoder.feature_extractor.blocks.11.norm1.weight"] = torch.ones(32)
    state["model.encoder.feature_extractor.norm.weight"] = torch.ones(32)
    model.load_state_dict(convert_anomalib_state_dict(state, model), strict=True)
    torch.testing.assert_close(model.bottleneck[0].fc1.weight, state["model.bottleneck.0.fc1.weight"])


def test_model_config_selects_its_dinov2_backbone_unless_told_otherwise():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("config", overrides=["model=dinomaly"]).backbone.name == "dinov2_vitb14_reg4"
        chosen = compose("config", overrides=["model=dinomaly", "backbone=dinov2_vits14_reg4"])
        assert chosen.backbone.name == "dinov2_vits14_reg4"
        preset = compose("config", overrides=["experiment=dinomaly"])
        assert list(preset.transform.center_crop) == [392, 392] and preset.trainer.max_steps == 5000
