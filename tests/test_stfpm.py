# tests/test_stfpm.py
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.metrics.auroc import auroc
from defectvad.models.stfpm.anomaly_map import AnomalyMapGenerator
from defectvad.models.stfpm.loss import StfpmLoss
from defectvad.models.stfpm.torch_model import StfpmModel
from defectvad.models.stfpm.trainer import StfpmTrainer

from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]


def make_trainer():
    torch.manual_seed(0)
    return StfpmTrainer(backbone="resnet18", lr=0.4)


def test_score_is_the_map_maximum_and_training_gives_both_feature_sets():
    torch.manual_seed(0)
    model = StfpmModel(backbone="resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    outputs = model(images)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    assert outputs["anomaly_map"].min() >= 0
    model.train()
    teacher, student = model(images)
    assert {k: tuple(v.shape) for k, v in teacher.items()} == {
        "layer1": (2, 64, 16, 16), "layer2": (2, 128, 8, 8), "layer3": (2, 256, 4, 4)}
    assert {k: tuple(v.shape) for k, v in student.items()} == {k: tuple(v.shape) for k, v in teacher.items()}
    assert student["layer1"].requires_grad and not teacher["layer1"].requires_grad


def test_parameter_names_follow_anomalib():
    model = StfpmModel(backbone="resnet18")
    names = list(model.state_dict())
    teacher = [n for n in names if n.startswith("teacher_model.feature_extractor.")]
    student = [n for n in names if n.startswith("student_model.feature_extractor.")]
    assert len(teacher) + len(student) == len(names) == 180
    assert [n.split(".", 1)[1] for n in teacher] == [n.split(".", 1)[1] for n in student]
    assert "teacher_model.feature_extractor.conv1.weight" in names
    assert "student_model.feature_extractor.layer3.1.bn2.num_batches_tracked" in names
    assert not any("layer4" in n or ".fc." in n for n in names)
    assert not any(p.requires_grad for p in model.teacher_model.parameters())
    assert all(p.requires_grad for p in model.student_model.parameters())


def test_loss_and_map_follow_the_formulas():
    torch.manual_seed(0)
    shapes = {"layer1": (2, 8, 8, 8), "layer2": (2, 16, 4, 4)}
    teacher = {k: torch.randn(s) for k, s in shapes.items()}
    student = {k: torch.randn(s) for k, s in shapes.items()}
    expected_loss = 0.0
    expected_map = torch.ones(2, 1, 32, 32)
    for layer, (_, _, h, w) in shapes.items():
        t = teacher[layer] / teacher[layer].norm(dim=1, keepdim=True)
        s = student[layer] / student[layer].norm(dim=1, keepdim=True)
        expected_loss += 0.5 / (h * w) * ((t - s) ** 2).sum()
        layer_map = 0.5 * ((t - s) ** 2).sum(1, keepdim=True)
        expected_map = expected_map * F.interpolate(layer_map, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(StfpmLoss()(teacher, student), expected_loss, rtol=1e-5)
    assert torch.allclose(AnomalyMapGenerator()(teacher, student, (32, 32)), expected_map, rtol=1e-5, atol=1e-7)
    # identical features: no loss, no anomaly
    assert StfpmLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert AnomalyMapGenerator()(teacher, teacher, (32, 32)).abs().max().item() < 1e-6


def test_optimizer_is_anomalib_sgd_on_the_student_only():
    trainer = make_trainer()
    assert trainer.trainer_arguments["max_epochs"] == 100
    optimizer = trainer.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["dampening"], group["weight_decay"]) == (0.4, 0.9, 0.0, 0.001)
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.model.student_model.parameters()}


def test_training_step_lowers_loss_and_leaves_the_teacher_alone():
    trainer = make_trainer()
    trainer.setup_optimizers()
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher_model.state_dict().items()}
    batch = {"image": StripesDataset(4)[0]["image"].unsqueeze(0).repeat(4, 1, 1, 1) + 0.1 * torch.randn(4, 3, 64, 64)}
    trainer.model.train()
    losses = []
    for step in range(3):
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    teacher_after = trainer.model.teacher_model.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not trainer.model.teacher_model.feature_extractor.training


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("stfpm") / "weights"
    trainer = make_trainer().configure_engine(max_epochs=6, weights_dir=weights_dir, progress_bar=False)
    train_loader = DataLoader(StripesDataset(16), batch_size=8, shuffle=True)
    test_loader = DataLoader(StripesDataset(16, anomalous_every=2, seed=1), batch_size=8)
    trainer.fit(train_loader)
    return trainer, test_loader, weights_dir


def test_fit_and_predict_separate_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert len(trainer.train_losses) == 6 and trainer.train_losses[-1] < trainer.train_losses[0]
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (16, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.8
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.8


def test_early_stopping_on_train_loss(tmp_path):
    trainer = make_trainer().configure_engine(
        max_epochs=20, progress_bar=False, early_stopping={"monitor": "train_loss", "mode": "min", "patience": 1,
                                                           "min_delta": 1e9})
    loader = DataLoader(StripesDataset(8, anomalous_every=2), batch_size=8)
    trainer.fit(DataLoader(StripesDataset(4), batch_size=4), loader)
    # nothing beats the first epoch by 1e9, so the second epoch stops training
    assert trainer.current_epoch == 2
    assert trainer.validation_metrics["train_loss"] == trainer.train_losses[-1]


def test_batchnorm_recalibration_changes_only_running_statistics():
    dataset = StripesDataset(8)
    trainers = {}
    for recalibrate in (True, False):
        torch.manual_seed(0)
        # shuffled from the global RNG: the recalibration pass must not draw from it
        train_loader = DataLoader(dataset, batch_size=4, shuffle=True)
        trainer = StfpmTrainer(backbone="resnet18", recalibrate_batchnorm=recalibrate)
        trainers[recalibrate] = trainer.configure_engine(max_epochs=3, progress_bar=False).fit(train_loader)
    on, off = (dict(trainers[flag].model.student_model.named_parameters()) for flag in (True, False))
    assert all(torch.equal(on[name], off[name]) for name in on)
    assert trainers[True].train_losses == trainers[False].train_losses
    # the first BatchNorm's running mean is now the plain average of its per-batch input means
    student = trainers[True].model.student_model.feature_extractor
    batch_means = []
    hook = student.bn1.register_forward_hook(lambda module, inputs, output: batch_means.append(inputs[0].mean((0, 2, 3))))
    student.eval()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=4):
            student.bn1(student.conv1(batch["image"]))
    hook.remove()
    assert torch.allclose(student.bn1.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
    off_mean = trainers[False].model.student_model.feature_extractor.bn1.running_mean
    assert not torch.allclose(student.bn1.running_mean, off_mean, atol=1e-3)
    assert int(student.bn1.num_batches_tracked) == 2  # one pass of two batches


def test_recalibration_runs_before_each_validation_and_after_the_last_epoch():
    assert StfpmTrainer(backbone="resnet18").recalibrate_batchnorm is False  # anomalib's behaviour
    train_loader = DataLoader(StripesDataset(2, size=32), batch_size=2)
    val_loader = DataLoader(StripesDataset(2, anomalous_every=2, size=32), batch_size=2)
    calls = {}
    for every, loader in ((1, None), (2, val_loader)):
        torch.manual_seed(0)
        trainer = StfpmTrainer(backbone="resnet18", recalibrate_batchnorm=True)
        trainer.configure_engine(max_epochs=3, progress_bar=False, check_val_every_n_epoch=every)
        epochs = calls[every] = []
        trainer.recalibrate_student = lambda _, trainer=trainer, epochs=epochs: epochs.append(trainer.current_epoch + 1)
        trainer.fit(train_loader, loader)
    assert calls == {1: [3], 2: [2, 3]}


def test_config_builds_anomalib_defaults():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "stfpm.yaml")
    trainer = instantiate(cfg, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(trainer, StfpmTrainer)
    assert (trainer.lr, trainer.momentum, trainer.weight_decay) == (0.4, 0.9, 0.001)
