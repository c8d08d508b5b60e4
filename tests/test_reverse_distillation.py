# tests/test_reverse_distillation.py
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.backbones.weights import resolve_weights
from defectvad.components.blur import GaussianBlur2d
from defectvad.errors import ConfigError
from defectvad.metrics.auroc import auroc
from defectvad.models.reverse_distillation.anomaly_map import AnomalyMapGenerator
from defectvad.models.reverse_distillation.loss import ReverseDistillationLoss
from defectvad.models.reverse_distillation.torch_model import ReverseDistillationModel
from defectvad.models.reverse_distillation.trainer import ReverseDistillationTrainer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_items(count, anomalous_every=0, seed=0, size=64):
    # noisy stripes with a random phase; anomalous images carry a bright square
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(size).float()
    items = []
    for index in range(count):
        phase = torch.rand(1, generator=generator).item() * 2 * math.pi
        image = 0.5 * torch.sin(coords / 3.0 + phase).reshape(1, 1, size).expand(3, size, size)
        image = image + 0.1 * torch.randn(3, size, size, generator=generator)
        mask = torch.zeros(1, size, size)
        label = int(anomalous_every > 0 and index % anomalous_every == 0)
        if label:
            top, left = torch.randint(4, size - 20, (2,), generator=generator).tolist()
            image[:, top:top + 16, left:left + 16] = 2.0
            mask[:, top:top + 16, left:left + 16] = 1.0
        items.append({"image": image, "label": label, "mask": mask, "image_path": f"img{index}.png"})
    return items


def make_trainer(backbone="efficientnet_lite0"):
    torch.manual_seed(0)
    weights = resolve_weights(backbone) if backbone == "efficientnet_lite0" else None
    return ReverseDistillationTrainer(backbone=backbone, weights_path=weights)


def test_score_is_the_map_maximum_and_training_gives_both_feature_sets():
    torch.manual_seed(0)
    model = ReverseDistillationModel(backbone="resnet18").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    # add mode: a sum of three cosine distances, each in [0, 2]
    assert 0 <= outputs["anomaly_map"].min() and outputs["anomaly_map"].max() <= 6
    model.train()
    encoder_features, decoder_features = model(images)
    shapes = [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [tuple(f.shape) for f in encoder_features] == shapes
    assert [tuple(f.shape) for f in decoder_features] == shapes
    assert not encoder_features[0].requires_grad and decoder_features[0].requires_grad


@pytest.mark.parametrize("backbone, count, shapes", [
    ("resnet18", 234, {"bottleneck.bn_layer.0.conv1.weight": (512, 768, 3, 3),
                       "bottleneck.conv4.weight": (512, 1024, 1, 1),
                       "decoder.layer1.0.upsample.0.weight": (512, 256, 2, 2),
                       "decoder.layer3.1.conv2.weight": (64, 64, 3, 3)}),
    ("wide_resnet50_2", 594, {"bottleneck.bn_layer.0.conv2.weight": (512, 512, 3, 3),
                              "bottleneck.bn_layer.0.downsample.0.weight": (2048, 3072, 1, 1),
                              "decoder.layer1.0.conv2.weight": (512, 512, 2, 2),
                              "decoder.layer3.5.conv3.weight": (256, 128, 1, 1)}),
])
def test_state_dict_names_and_shapes_follow_anomalib(backbone, count, shapes):
    # shapes only: the meta device allocates nothing
    with torch.device("meta"):
        state = ReverseDistillationModel(backbone=backbone).state_dict()
    assert len(state) == count
    assert {key.split(".")[0] for key in state} == {"encoder", "bottleneck", "decoder"}
    assert "encoder.feature_extractor.conv1.weight" in state
    assert not any("layer4" in key for key in state)
    assert {key: tuple(state[key].shape) for key in shapes} == shapes


def test_loss_and_map_follow_the_formulas():
    torch.manual_seed(0)
    encoder = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    decoder = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    expected_loss = 0
    for e, d in zip(encoder, decoder):
        e, d = e.flatten(1), d.flatten(1)
        expected_loss = expected_loss + (1 - (e * d).sum(1) / (e.norm(dim=1) * d.norm(dim=1))).mean()
    assert torch.allclose(ReverseDistillationLoss()(encoder, decoder), expected_loss, rtol=1e-5)
    assert ReverseDistillationLoss()(encoder, encoder).item() == pytest.approx(0.0, abs=1e-6)
    maps = []
    for e, d in zip(encoder, decoder):
        distance = 1 - (e * d).sum(1, keepdim=True) / (e.norm(dim=1, keepdim=True) * d.norm(dim=1, keepdim=True))
        maps.append(F.interpolate(distance, size=(32, 32), mode="bilinear", align_corners=True))
    blur = GaussianBlur2d(sigma=4, kernel_size=33)
    added = AnomalyMapGenerator(sigma=4, mode="add")(encoder, decoder, (32, 32))
    multiplied = AnomalyMapGenerator(sigma=4, mode="multiply")(encoder, decoder, (32, 32))
    assert torch.allclose(added, blur(maps[0] + maps[1]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(multiplied, blur(maps[0] * maps[1]), rtol=1e-5, atol=1e-6)
    assert AnomalyMapGenerator()(encoder, encoder, (32, 32)).abs().max().item() < 1e-5
    with pytest.raises(ConfigError, match="add, multiply"):
        AnomalyMapGenerator(mode="max")


def test_optimizer_is_anomalib_adam_on_bottleneck_and_decoder():
    trainer = make_trainer()
    assert trainer.trainer_arguments == {"max_epochs": 200, "gradient_clip_val": 0}
    optimizer = trainer.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert (group["lr"], group["betas"]) == (0.005, (0.5, 0.99))
    expected = list(trainer.model.decoder.parameters()) + list(trainer.model.bottleneck.parameters())
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_training_step_lowers_loss_and_leaves_the_encoder_alone():
    trainer = make_trainer()
    trainer.setup_optimizers()
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    batch = {"image": torch.stack([item["image"] for item in make_items(4)])}
    trainer.model.train()
    losses = []
    for step in range(3):
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    encoder_after = trainer.model.encoder.state_dict()
    assert all(torch.equal(encoder_before[k], encoder_after[k]) for k in encoder_before)
    assert not trainer.model.encoder.feature_extractor.training


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    weights_dir = tmp_path_factory.mktemp("reverse_distillation") / "weights"
    trainer = make_trainer().configure_engine(max_epochs=6, weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(make_items(16), batch_size=8, shuffle=True))
    torch.set_num_threads(threads)
    return trainer, DataLoader(make_items(16, anomalous_every=2, seed=1), batch_size=8), weights_dir


def test_fit_and_predict_separate_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert len(trainer.train_losses) == 6 and trainer.train_losses[-1] < trainer.train_losses[0]
    assert trainer.summary() == {"train_loss": trainer.train_losses[-1], "epochs": 6}
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (16, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9


def test_bad_backbone_and_layers_are_config_errors():
    with pytest.raises(ConfigError, match="choose one of: resnet18, resnet34, resnet50, wide_resnet50_2"):
        ReverseDistillationModel(backbone="vgg16")
    with pytest.raises(ConfigError, match="three consecutive stages"):
        ReverseDistillationModel(backbone="resnet18", layers=["layer1", "layer3", "layer4"])


def test_config_builds_anomalib_defaults():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "reverse_distillation.yaml")
    trainer = instantiate(cfg, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(trainer, ReverseDistillationTrainer)
    assert (trainer.lr, trainer.betas, trainer.model.anomaly_map_generator.mode) == (0.005, (0.5, 0.99), "add")
