# tests/test_cfa.py
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.backbones.weights import resolve_weights
from defectvad.errors import TrainingError
from defectvad.metrics.auroc import auroc
from defectvad.models.cfa.anomaly_map import AnomalyMapGenerator
from defectvad.models.cfa.loss import CfaLoss
from defectvad.models.cfa import torch_model
from defectvad.models.cfa.torch_model import AddCoords, CfaModel
from defectvad.models.cfa.trainer import CfaTrainer

from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def stacked(dataset):
    return {"image": torch.stack([item["image"] for item in dataset])}


def test_state_dict_names_follow_anomalib_and_an_unfitted_model_refuses():
    torch.manual_seed(0)
    model = CfaModel(backbone="resnet18")
    state = model.state_dict()
    assert state["memory_bank"].ndim == 0
    # anomalib's CoordConv keeps an unused weight of its own next to the inner conv2d
    assert state["descriptor.layer.weight"].shape == (448, 448, 1, 1)
    assert state["descriptor.layer.conv2d.weight"].shape == (448, 450, 1, 1)
    assert "feature_extractor.conv1.weight" in state and "feature_extractor.layer3.1.bn2.running_mean" in state
    assert not any("layer4" in key or key.startswith("extractor.") or "blur" in key for key in state)
    with pytest.raises(TrainingError, match="memory bank is empty"):
        model(torch.randn(1, 3, 64, 64))


def test_coordinates_and_descriptor_shape():
    coords = AddCoords()(torch.zeros(2, 1, 3, 5))
    assert coords.shape == (2, 3, 3, 5)
    assert torch.equal(coords[0, 1, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(coords[1, 2, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    torch.manual_seed(0)
    model = CfaModel(backbone="resnet18", gamma_d=2)
    descriptor = model.descriptor(model.get_features(torch.randn(2, 3, 64, 64)))
    assert descriptor.shape == (2, 224, 16, 16)


def test_loss_and_score_follow_the_formulas():
    torch.manual_seed(0)
    distance = torch.rand(2, 5, 9)
    nearest = distance.sort(dim=-1).values
    radius_sq = 1e-5**2
    attraction = (nearest[:, :, :3] - radius_sq).clamp_min(0).mean()
    repulsion = (radius_sq - nearest[:, :, 3:6] - 0.1).clamp_min(0).mean()
    assert torch.allclose(CfaLoss()(distance), (attraction + repulsion) * 1000)
    # with radius 1e-5 the repulsion term (r^2 - d > 0.1) never fires: only attraction counts
    assert CfaLoss()(torch.full((1, 2, 6), 0.05)).item() == pytest.approx(0.05 * 1000, rel=1e-5)
    assert CfaLoss(radius=1.0)(torch.full((1, 2, 6), 0.5)).item() == pytest.approx((0 + 0.4) * 1000, rel=1e-5)
    root = nearest[:, :, :3].sqrt()
    expected = (F.softmin(root, dim=-1)[:, :, 0] * root[:, :, 0]).reshape(2, 1, 1, 5)
    assert torch.allclose(AnomalyMapGenerator(3).compute_score(distance, (1, 5)), expected)
    # a tiny negative squared distance from rounding gives 0, not NaN
    assert torch.isfinite(AnomalyMapGenerator(3).compute_score(distance - distance.min() - 1e-7, (1, 5))).all()


def test_memory_bank_is_the_mean_descriptor_of_the_training_set():
    torch.manual_seed(0)
    model = CfaModel(backbone="resnet18")
    batches = [stacked(StripesDataset(2, seed=seed)) for seed in range(3)]
    model.initialize_centroid(batches)
    with torch.no_grad():
        descriptors = torch.cat([model.descriptor(model.get_features(b["image"])) for b in batches])
    expected = descriptors.mean(dim=0).reshape(448, -1)
    assert model.memory_bank.shape == (448, 256)
    torch.testing.assert_close(model.memory_bank, expected, rtol=1e-5, atol=1e-5)
    distance = model.compute_distance(descriptors[:1])
    brute = torch.cdist(descriptors[:1].reshape(1, 448, -1).transpose(1, 2), expected.T.unsqueeze(0)) ** 2
    torch.testing.assert_close(distance, brute, rtol=1e-3, atol=1e-2)


def test_memory_bank_clusters_with_gamma_c():
    torch.manual_seed(0)
    model = CfaModel(backbone="resnet18", gamma_c=4)
    model.initialize_centroid([stacked(StripesDataset(2))])
    assert model.memory_bank.shape == (448, 64)


def make_trainer():
    torch.manual_seed(0)
    return CfaTrainer(backbone="efficientnet_lite0")


def test_optimizer_is_anomalib_adamw_and_a_step_lowers_the_loss():
    trainer = make_trainer()
    batch = stacked(StripesDataset(8))
    trainer.model.initialize_centroid([batch])
    trainer.setup_optimizers()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"], group["amsgrad"]) == (0.001, 0.0005, True)
    trainer.model.train()
    losses = []
    for step in range(3):
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("cfa") / "weights"
    torch.manual_seed(0)
    # the demo backbone with its ImageNet weights (shipped in a Python package)
    trainer = CfaTrainer(backbone="efficientnet_lite0", weights_path=resolve_weights("efficientnet_lite0"))
    trainer.configure_engine(max_epochs=2, weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(StripesDataset(16), batch_size=8, shuffle=True))
    return trainer, DataLoader(StripesDataset(12, anomalous_every=2, seed=1), batch_size=6), weights_dir


def test_fit_builds_the_bank_and_separates_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert trainer.model.memory_bank.shape == (176, 256)
    assert len(trainer.train_losses) == 2 and trainer.train_losses[1] < trainer.train_losses[0]
    predictions = trainer.predict(test_loader)
    assert predictions["pred_score"].shape == (12,)
    assert predictions["anomaly_map"].shape == (12, 1, 64, 64)
    assert torch.equal(predictions["pred_score"], predictions["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9
    assert trainer.summary()["memory_bank"] == [176, 256]


def test_evaluation_in_blocks_gives_the_same_maps(fitted, monkeypatch):
    trainer, test_loader, _ = fitted
    images = next(iter(test_loader))["image"]
    with torch.no_grad():
        whole = trainer.model.eval()(images)
        # one image per block
        monkeypatch.setattr(torch_model, "EVAL_BLOCK_ELEMENTS", 1)
        blocks = trainer.model(images)
    torch.testing.assert_close(blocks["anomaly_map"], whole["anomaly_map"], rtol=1e-5, atol=1e-6)


def test_config_builds_anomalib_defaults():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "cfa.yaml")
    trainer = instantiate(cfg, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(trainer, CfaTrainer)
    assert (trainer.lr, trainer.weight_decay, trainer.amsgrad, trainer.max_epochs) == (0.001, 0.0005, True, 30)
    assert (trainer.loss.num_nearest_neighbors, trainer.loss.num_hard_negative_features) == (3, 3)
    assert trainer.loss.radius.item() == pytest.approx(1e-5)
    assert (trainer.model.gamma_c, trainer.model.gamma_d) == (1, 1)
