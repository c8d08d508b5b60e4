# tests/test_uninet.py
import hashlib
import math

import pytest
import torch
from torch.nn import functional as F

from defectvad.errors import ConfigError
from defectvad.models.uninet.anomaly_map import weighted_decision_mechanism
from defectvad.models.uninet.feature_selection import DomainRelatedFeatureSelection
from defectvad.models.uninet.loss import UniNetLoss
from defectvad.models.uninet.torch_model import UniNetModel
from defectvad.models.uninet.trainer import UniNetTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

# sha256 of the sorted "name:shape" lines of anomalib 2.7's UniNetModel(wide_resnet50_2, wide_resnet50_2) state dict
ANOMALIB_STATE_DIGEST = "33e6ce40aeb6c2d28529b038f60aed39d47f2cd6e7a206cb05d0f54928ea4d50"


def test_state_dict_names_and_shapes_are_anomalib_s():
    with torch.device("meta"):
        state = UniNetModel(backbone="wide_resnet50_2").state_dict()
    text = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    assert len(state) == 914
    assert hashlib.sha256(text.encode()).hexdigest() == ANOMALIB_STATE_DIGEST
    # anomalib's merge_kernel leaves the second branch as 3x3 convolutions with a bias
    assert tuple(state["bottleneck.bn_layer.0.0.conv7x7.weight"].shape) == (256, 1536, 3, 3)
    assert "bottleneck.bn_layer.0.2.conv7x7_.bias" in state and "teachers.source_teacher.conv1.weight" in state


def hand_loss(students, teachers, temperature, lambda_weight, normal=None, abnormal=None):
    total = 0.0
    for student, teacher in zip(students, teachers):
        s = student.flatten(2).transpose(1, 2)
        t = teacher.flatten(2).transpose(1, 2)
        s = s / s.norm(dim=2, keepdim=True)
        t = t / t.norm(dim=2, keepdim=True)
        cosine = (1 - (s * t).sum(2)).mean()
        logits = torch.einsum("bic,bjc->bij", s, t) / temperature
        matching = torch.exp(torch.diagonal(logits, dim1=1, dim2=2) - torch.logsumexp(logits, dim=2))
        chosen = matching if normal is None else matching[normal]
        total = total + lambda_weight * cosine + (1 - lambda_weight) * -torch.log(chosen).mean()
        total = total + (1 - chosen).clamp_min(0).mean()
        if abnormal is not None:
            total = total + (matching[abnormal] - 0.5).clamp_min(0).mean()
    return total


def test_loss_is_cosine_contrastive_and_margin_terms():
    torch.manual_seed(0)
    students = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    teachers = [s + 0.3 * torch.randn_like(s) for s in students]
    loss = UniNetLoss(temperature=0.1)
    expected = hand_loss(students, teachers, 0.1, 0.7)
    assert torch.allclose(loss(students, teachers), expected, rtol=1e-5)
    # all-normal masks (what training sees) give the same value as no mask
    assert torch.allclose(loss(students, teachers, mask=torch.zeros(2, 1, 8, 8)), expected, rtol=1e-5)
    # a lower temperature sharpens the contrast: different value
    assert not torch.allclose(UniNetLoss(temperature=2.0)(students, teachers), expected, rtol=1e-3)
    # an anomalous quarter of the image: its positions leave the normal terms and get the anomalous margin
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4, :4] = 1
    got = loss(students, teachers, mask=mask)
    total = 0.0
    for student, teacher in zip(students, teachers):
        scaled = F.interpolate(mask, size=student.shape[-2:], mode="nearest").flatten(1)
        total = total + hand_loss([student], [teacher], 0.1, 0.7, scaled == 0, scaled == 1)
    assert torch.allclose(got, total, rtol=1e-5)


def test_feature_selection_weighs_by_the_teacher_s_spatial_softmax():
    torch.manual_seed(0)
    selection = DomainRelatedFeatureSelection(channels=(4, 8))
    assert [tuple(p.shape) for p in selection.parameters()] == [(1, 4, 1, 1), (1, 8, 1, 1)]
    students = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2), torch.randn(2, 4, 3, 3)]
    teachers = [torch.randn_like(s) for s in students]
    with torch.no_grad():
        selection.theta1.fill_(-30.0)
    got = selection(students, teachers)
    # theta 0 -> clamp(sigmoid(0) + 0.5, max=1) = 1; theta -30 -> 0.5; the third scale reuses theta1
    for feature, student, teacher, theta in zip(got, students, teachers, (0.5, 1.0, 0.5)):
        flat = teacher.flatten(2)
        softmax = (flat.exp() / flat.exp().sum(-1, keepdim=True)).view_as(teacher)
        expected = student * softmax * (theta + teacher.mean(dim=(2, 3), keepdim=True))
        assert torch.allclose(feature, expected, rtol=1e-5, atol=1e-7)


def gaussian_score(anomaly_map):
    # a 5x5 Gaussian of sigma 4 with reflected borders, then the maximum
    x = torch.arange(5.0) - 2
    kernel = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / 32)
    blurred = F.conv2d(F.pad(anomaly_map, (2, 2, 2, 2), mode="reflect"), (kernel / kernel.sum())[None, None])
    return blurred.flatten(1).amax(1)


def test_map_is_the_sum_of_upsampled_distances_and_the_score_its_blurred_maximum():
    torch.manual_seed(0)
    constant = [torch.full((2, 4, 4), 0.25), torch.full((2, 2, 2), 0.5)]
    score, anomaly_map = weighted_decision_mechanism(constant, (16, 16))
    assert anomaly_map.shape == (2, 1, 16, 16)
    assert torch.allclose(anomaly_map, torch.full_like(anomaly_map, 0.75))
    assert torch.allclose(score, torch.full((2,), 0.75))
    # a single 2x2 distance map: bilinear with aligned corners reaches the corners' values exactly
    distance = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    score, anomaly_map = weighted_decision_mechanism([distance], (5, 5))
    assert anomaly_map[0, 0, 0].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert anomaly_map[0, 0, -1, -1].item() == pytest.approx(3.0)
    assert score.item() == pytest.approx(gaussian_score(anomaly_map).item(), rel=1e-6)
    assert score.item() < anomaly_map.max().item()


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    return UniNetTrainer(backbone="efficientnet_lite0").configure_engine(max_epochs=10)


def test_evaluation_map_sums_six_cosine_distances(trainer):
    model = trainer.model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
        teacher_features, inputs = model.teachers(images)
        decoded = model.student(model.bottleneck(inputs))
    assert outputs["pred_score"].shape == (2,) and outputs["anomaly_map"].shape == (2, 1, 64, 64)
    # first halves against the source teacher, second halves against the target teacher
    students = [d[:2] for d in decoded] + [d[2:] for d in decoded]
    expected = sum(F.interpolate((1 - F.cosine_similarity(t, s)).unsqueeze(1), size=(64, 64), mode="bilinear",
                                 align_corners=True) for t, s in zip(teacher_features, students))
    assert torch.allclose(outputs["anomaly_map"], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(outputs["pred_score"], gaussian_score(expected), rtol=1e-5)
    # six cosine distances, each in [0, 2]
    assert 0 <= outputs["anomaly_map"].min() and outputs["anomaly_map"].max() <= 12


def test_optimizer_schedule_and_a_step_that_leaves_the_source_teacher_alone(trainer):
    trainer.setup_optimizers()
    groups = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in groups] == [0.005, 0.005, 0.005, 1e-6]
    assert (groups[0]["betas"], groups[0]["eps"], groups[0]["weight_decay"], groups[0]["amsgrad"]) == \
        ((0.9, 0.999), 1e-10, 1e-5, True)
    model = trainer.model
    assert [id(p) for p in groups[3]["params"]] == [id(p) for p in model.teachers.target_teacher.parameters()]
    assert not any(id(p) in {id(q) for g in groups for q in g["params"]} for p in model.fc.parameters())
    assert dict(trainer.scheduler.milestones) == {8.0: 1} and trainer.scheduler.gamma == 0.2
    source = {k: v.clone() for k, v in model.teachers.source_teacher.state_dict().items()}
    target = {k: v.clone() for k, v in model.teachers.target_teacher.state_dict().items()}
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.zeros(2, 1, 64, 64), "label": torch.zeros(2)}
    model.train()
    loss = trainer.training_step(batch, 0)["loss"]
    trainer.backward_and_step(loss)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert not model.teachers.source_teacher.training
    assert all(torch.equal(source[k], v) for k, v in model.teachers.source_teacher.state_dict().items())
    changed = model.teachers.target_teacher.state_dict()
    assert not torch.equal(target["_conv_stem.weight"], changed["_conv_stem.weight"])
    # the target teacher moves by about its learning rate, the student's layers far more
    assert (target["_conv_stem.weight"] - changed["_conv_stem.weight"]).abs().max() < 1e-5


def test_max_steps_milestone_counts_epochs_as_anomalib():
    torch.manual_seed(0)
    trainer = UniNetTrainer(backbone="efficientnet_lite0").configure_engine(max_epochs=10, max_steps=50)
    trainer.setup_optimizers()
    assert dict(trainer.scheduler.milestones) == {40: 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "wide_resnet50_2", "student_backbone": "resnet18"}, "must match"),
    ({"backbone": "dinov2_vits14"}, "no student decoder"),
    ({"backbone": "resnet18", "temperature": 0}, "temperature"),
])
def test_configuration_errors(kwargs, message):
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        UniNetTrainer(**kwargs)
