# tests/test_supersimplenet.py
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from scipy import ndimage
from torch.nn import functional as F

from defectvad.errors import ConfigError
from defectvad.models.supersimplenet.anomaly_generator import AnomalyGenerator
from defectvad.models.supersimplenet.loss import SSNLoss
from defectvad.models.supersimplenet.torch_model import SupersimplenetModel
from defectvad.models.supersimplenet.trainer import SupersimplenetTrainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SupersimplenetModel(backbone="resnet18")


def focal_by_hand(logits, targets, gamma=4.0):
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        total += -((1 - p) ** gamma) * math.log(p) if t == 1 else -(p**gamma) * math.log(1 - p)
    return total / logits.numel()


def test_loss_is_focal_on_map_and_score_plus_truncated_l1_on_the_map():
    torch.manual_seed(0)
    pred_map = 2 * torch.randn(4, 1, 3, 3)
    pred_score = 2 * torch.randn(4)
    mask = (torch.rand(4, 1, 3, 3) > 0.6).float()
    label = torch.tensor([0.0, 1.0, 1.0, 0.0])
    values, targets = pred_map.flatten().tolist(), mask.flatten().tolist()
    normal = [max(v + 0.5, 0) for v, t in zip(values, targets) if t == 0]
    anomalous = [max(0.5 - v, 0) for v, t in zip(values, targets) if t == 1]
    truncated = sum(normal) / len(normal) + sum(anomalous) / len(anomalous)
    expected = focal_by_hand(pred_map, mask) + truncated + focal_by_hand(pred_score, label)
    assert SSNLoss()(pred_map, pred_score, mask, label).item() == pytest.approx(expected, rel=1e-5)
    # only normal pixels: the anomalous side adds nothing; a logit below -0.5 costs no L1
    assert SSNLoss().trunc_l1_loss(torch.tensor([-1.0, 0.5]), torch.zeros(2)).item() == pytest.approx(0.5)
    assert SSNLoss().trunc_l1_loss(torch.tensor([2.0, 0.0]), torch.ones(2)).item() == pytest.approx(0.25)


def test_generator_adds_the_same_gaussian_noise_inside_perlin_regions_only():
    torch.manual_seed(0)
    batch, channels, size = 32, 8, 16
    features, adapted = torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size)
    masks = torch.zeros(batch, 1, size, size)
    masks[0, :, :4, :4] = 1
    labels = torch.zeros(batch)
    labels[0] = 1
    noised_features, noised_adapted, new_masks, new_labels = AnomalyGenerator(0.0, 0.015, 0.2)(
        features, adapted, masks, labels)
    assert noised_adapted.shape == (2 * batch, channels, size, size) and new_masks.shape == (2 * batch, 1, size, size)
    added = noised_adapted - torch.cat((adapted, adapted))
    assert torch.allclose(noised_features - torch.cat((features, features)), added, atol=1e-6)
    assert set(new_masks.unique().tolist()) <= {0.0, 1.0}
    doubled = torch.cat((masks, masks))
    # noise exactly where the mask is new; the given anomaly stays in the mask with no noise on it
    region = (new_masks - doubled).bool().expand_as(added)
    assert added[~region].abs().max() == 0 and bool(new_masks[doubled.bool()].all())
    inside = added[region]
    assert inside.std().item() == pytest.approx(0.015, rel=0.05) and abs(inside.mean().item()) < 1e-3
    # a label is 1 where the mask holds anything; about half of the maps get no region
    assert torch.equal(new_labels, new_masks.flatten(1).amax(1))
    empty = (new_masks - doubled).flatten(1).amax(1) == 0
    assert 0.25 < empty.float().mean().item() < 0.75


def test_perlin_masks_are_blobs_at_the_feature_size():
    torch.manual_seed(1)
    masks = AnomalyGenerator(threshold=0.2).generate_perlin(200, 12, 20)
    assert masks.shape == (200, 1, 12, 20)
    covered = masks.flatten(1).float().mean(1)
    # about half are empty; a drawn one covers part of the map (threshold 0.2 of a field in about [-1, 1])
    assert 80 < int((covered == 0).sum()) < 120
    assert 0.1 < covered[covered > 0].mean().item() < 0.5
    assert int((covered == 1).sum()) < 10


def reference_map(logits, size):
    # bilinear upscaling, a 25x25 Gaussian of sigma 4 with mirrored borders (torch's reflect), sigmoid
    upscaled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).numpy()
    blurred = np.stack([ndimage.gaussian_filter(m[0].astype(np.float64), 4, mode="mirror", truncate=3.0)[None]
                        for m in upscaled])
    return 1 / (1 + np.exp(-blurred))


def test_map_and_score_from_known_head_outputs(model, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    score_logits = torch.tensor([-2.0, 3.0])
    monkeypatch.setattr(model.segdec, "forward", lambda seg_features, cls_features: (logits, score_logits))
    model.eval()
    outputs = model(torch.randn(2, 3, 32, 48))
    assert outputs.anomaly_map.shape == (2, 1, 32, 48)
    assert np.allclose(outputs.anomaly_map.numpy(), reference_map(logits, (32, 48)), atol=1e-6)
    assert torch.allclose(outputs.pred_score, torch.sigmoid(score_logits))


def test_heads_read_adapted_features_for_the_map_and_raw_ones_for_the_score(model):
    torch.manual_seed(0)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.feature_extractor(images)
        adapted = model.adaptor(features)
        logits, score = model.segdec(adapted, features)
        outputs = model(images)
    # layer2 (1/8) of resnet18 doubled: 8x8; 128 + 256 channels
    assert features.shape == (2, 384, 8, 8)
    assert torch.allclose(outputs.pred_score, torch.sigmoid(score))
    pooled = torch.cat((model.segdec.dec_max_pool(model.segdec.cls_conv(torch.cat((features, logits), 1))),
                        model.segdec.dec_avg_pool(model.segdec.cls_conv(torch.cat((features, logits), 1))),
                        logits.amax((2, 3), keepdim=True), logits.mean((2, 3), keepdim=True)), 1).flatten(1)
    assert torch.allclose(model.segdec.cls_fc(pooled)[:, 0], score, atol=1e-5)


def test_state_dict_names_follow_anomalib(model):
    state = model.state_dict()
    own = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("feature_extractor.")}
    assert own == {
        "adaptor.projection.weight": (384, 384, 1, 1), "adaptor.projection.bias": (384,),
        "segdec.seg_head.0.weight": (1024, 384, 1, 1), "segdec.seg_head.0.bias": (1024,),
        "segdec.seg_head.1.weight": (1024,), "segdec.seg_head.1.bias": (1024,),
        "segdec.seg_head.1.running_mean": (1024,), "segdec.seg_head.1.running_var": (1024,),
        "segdec.seg_head.1.num_batches_tracked": (), "segdec.seg_head.3.weight": (1, 1024, 1, 1),
        "segdec.cls_conv.0.weight": (128, 385, 5, 5), "segdec.cls_conv.0.bias": (128,),
        "segdec.cls_conv.1.weight": (128,), "segdec.cls_conv.1.bias": (128,),
        "segdec.cls_conv.1.running_mean": (128,), "segdec.cls_conv.1.running_var": (128,),
        "segdec.cls_conv.1.num_batches_tracked": (), "segdec.cls_fc.weight": (1, 258), "segdec.cls_fc.bias": (1,),
        "anomaly_map_generator.smoothing.kernel": (1, 1, 25, 25),
    }
    backbone = [k for k in state if k.startswith("feature_extractor.feature_extractor.feature_extractor.")]
    assert len(backbone) == len(state) - len(own)
    assert "feature_extractor.feature_extractor.feature_extractor.layer3.1.bn2.running_var" in backbone
    assert not any("layer4" in k or ".fc." in k for k in backbone)


def test_training_forward_doubles_the_batch_and_stops_the_score_gradient(model):
    torch.manual_seed(0)
    model.train()
    logits, score, masks, labels = model(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 1, 32, 32),
                                         labels=torch.zeros(2, dtype=torch.long))
    assert logits.shape == masks.shape == (4, 1, 8, 8) and score.shape == labels.shape == (4,)
    model.zero_grad()
    score.sum().backward()
    assert model.segdec.seg_head[0].weight.grad is None and model.adaptor.projection.weight.grad is None
    assert model.segdec.cls_fc.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="masks"):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    model.eval()


def test_trainer_optimizer_schedule_and_a_step_that_learns():
    torch.manual_seed(0)
    trainer = SupersimplenetTrainer(backbone="resnet18")
    assert trainer.trainer_arguments == {"max_epochs": 300, "gradient_clip_val": 0}
    optimizer, scheduler = trainer.configure_optimizers()
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert groups == [(0.0001, 0.01, 2), (0.0002, 0.00001, 11)]
    assert sorted(scheduler.milestones) == [240, 270] and scheduler.gamma == 0.4
    trainer.optimizer = optimizer
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.zeros(2, 1, 32, 32), "label": torch.zeros(2)}
    trainer.model.train()
    losses = []
    for _ in range(4):
        torch.manual_seed(3)
        loss = trainer.training_step(batch, 0)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_supervised_is_refused_with_a_clear_message():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=supersimplenet", "model.supervised=true"])
    assert cfg.backbone.name == "wide_resnet50_2" and cfg.model.perlin_threshold == 0.2
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg.model, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(error.value.__cause__, ConfigError) and "model.supervised=false" in str(error.value.__cause__)
    with pytest.raises(ConfigError, match="fractions"):
        SupersimplenetTrainer(backbone="resnet18", milestones=[240, 270])
