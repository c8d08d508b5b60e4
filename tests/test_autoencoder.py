# tests/test_autoencoder.py
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.backbones.weights import resolve_weights
from defectvad.components.blur import GaussianBlur2d
from defectvad.errors import BackboneError, ConfigError
from defectvad.metrics.auroc import auroc
from defectvad.models.autoencoder.anomaly_map import AnomalyMapGenerator, compute_score
from defectvad.models.autoencoder.loss import AutoencoderLoss, VaeLoss
from defectvad.models.autoencoder.torch_model import AutoencoderModel, VaeModel
from defectvad.models.autoencoder.trainer import AutoencoderTrainer, VaeTrainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"latent_dim": 8, "depth": 3, "base_width": 8}


pytestmark = pytest.mark.usefixtures("single_thread")


def make_items(count, anomalous_every=0, seed=0, size=64):
    # grey stripes with a random phase in [0, 1]; anomalous images carry a square of noise
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(size).float()
    items = []
    for index in range(count):
        phase = torch.rand(1, generator=generator).item() * 2 * math.pi
        image = 0.5 + 0.25 * torch.sin(coords / 3.0 + phase).reshape(1, 1, size).expand(3, size, size)
        image = (image + 0.03 * torch.randn(3, size, size, generator=generator)).clamp(0, 1)
        mask = torch.zeros(1, size, size)
        label = int(anomalous_every > 0 and index % anomalous_every == 0)
        if label:
            side = size // 4
            top, left = torch.randint(2, size - side - 2, (2,), generator=generator).tolist()
            image[:, top:top + side, left:left + side] = torch.rand(3, side, side, generator=generator)
            mask[:, top:top + side, left:left + side] = 1.0
        items.append({"image": image, "label": label, "mask": mask, "image_path": f"img{index}.png"})
    return items


def lite0_features(**kwargs):
    return {"layer": "layer2", "backbone": "efficientnet_lite0", "weights_path": resolve_weights("efficientnet_lite0"),
            "latent_dim": 8, "depth": 2, "base_width": 16, **kwargs}


@pytest.mark.parametrize("model_class", [AutoencoderModel, VaeModel])
def test_pixel_models_score_the_map_maximum_and_decode_deterministically(model_class):
    torch.manual_seed(0)
    model = model_class(**SMALL).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    assert 0 < outputs["reconstruction"].min() and outputs["reconstruction"].max() < 1
    # evaluation decodes the VAE's mean: no sampling, the same image gives the same map twice
    with torch.no_grad():
        assert torch.equal(model(images)["anomaly_map"], outputs["anomaly_map"])
    # depth 3 stages: an 8 x 8 latent of latent_dim channels, twice that for the VAE's mean and log-variance
    assert model.encoder(images).shape == (2, 8 * model_class.latent_channels, 8, 8)
    model.train()
    trained = model(images)
    assert trained["target"] is images and trained["reconstruction"].shape == (2, 3, 64, 64)
    if model_class is VaeModel:
        assert trained["mu"].shape == trained["logvar"].shape == (2, 8, 8, 8)


def test_feature_variant_reconstructs_a_frozen_layer():
    torch.manual_seed(0)
    model = AutoencoderModel(**lite0_features()).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
    assert outputs["reconstruction"].shape == (2, 40, 8, 8)
    assert outputs["anomaly_map"].shape == (2, 1, 64, 64)
    state = model.state_dict()
    assert "feature_extractor.feature_extractor._conv_stem.weight" in state
    assert state["feature_norm.running_mean"].shape == (40,)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    model.train()
    target = model(images)["target"]
    # training standardises each channel with the batch's statistics
    assert target.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (target.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_map_and_scores_follow_the_formulas():
    torch.manual_seed(0)
    target, reconstruction = torch.rand(2, 5, 8, 8), torch.rand(2, 5, 8, 8)
    error = (target - reconstruction).pow(2).mean(1, keepdim=True)
    raw = AnomalyMapGenerator(blur_sigma=0)(target, reconstruction, (32, 32))
    assert torch.allclose(raw, F.interpolate(error, size=(32, 32), mode="bilinear", align_corners=False))
    blurred = AnomalyMapGenerator(blur_sigma=2)(target, reconstruction, (32, 32))
    assert torch.allclose(blurred, GaussianBlur2d(sigma=2)(raw), atol=1e-7)
    assert torch.equal(AnomalyMapGenerator(blur_sigma=0)(target, reconstruction, (8, 8)), error)
    anomaly_map = torch.arange(200.0).reshape(2, 1, 10, 10)
    assert compute_score(anomaly_map).tolist() == [99.0, 199.0]
    # the top 5% of 100 pixels: the five highest
    assert compute_score(anomaly_map, "topk", 0.05).tolist() == [97.0, 197.0]
    assert compute_score(anomaly_map, "topk", 1e-6).tolist() == [99.0, 199.0]


def test_losses_follow_the_formulas():
    torch.manual_seed(0)
    target, reconstruction = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mu, logvar = torch.randn(2, 4, 2, 2), 0.5 * torch.randn(2, 4, 2, 2)
    mse = F.mse_loss(reconstruction, target)
    assert torch.allclose(AutoencoderLoss()(target, reconstruction), mse)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    loss = VaeLoss(beta=0.5)
    assert torch.allclose(loss(target, reconstruction, mu, logvar), mse + 0.5 * kl / (3 * 16 * 16), rtol=1e-5)
    assert torch.allclose(loss(target, reconstruction, torch.zeros_like(mu), torch.zeros_like(logvar)), mse)


@pytest.mark.parametrize("trainer_class", [AutoencoderTrainer, VaeTrainer])
def test_training_step_lowers_the_loss_on_a_fixed_batch(trainer_class):
    torch.manual_seed(0)
    trainer = trainer_class(**SMALL)
    trainer.setup_optimizers()
    trainer.model.train()
    batch = {"image": torch.stack([item["image"] for item in make_items(4)])}
    losses = []
    for step in range(4):
        # the same latent noise at every step
        torch.manual_seed(1)
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.001


def fit(trainer_class, epochs, tmp_path, **kwargs):
    torch.manual_seed(0)
    trainer = trainer_class(**kwargs).configure_engine(max_epochs=epochs, weights_dir=tmp_path / "weights",
                                                        progress_bar=False)
    normalize = trainer.normalize_input
    train = make_items(16)
    test = make_items(16, anomalous_every=2, seed=1)
    if normalize:
        for item in train + test:
            item["image"] = (item["image"] - 0.45) / 0.225
    trainer.fit(DataLoader(train, batch_size=8, shuffle=True))
    return trainer, DataLoader(test, batch_size=8)


@pytest.mark.parametrize("trainer_class, kwargs", [
    (AutoencoderTrainer, SMALL),
    (VaeTrainer, SMALL),
    (AutoencoderTrainer, "features"),
])
def test_fit_and_predict_separate_anomalies(trainer_class, kwargs, tmp_path):
    kwargs = lite0_features() if kwargs == "features" else kwargs
    trainer, test_loader = fit(trainer_class, 15, tmp_path, **kwargs)
    assert trainer.train_losses[-1] < 0.75 * trainer.train_losses[0]
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (16, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="max, topk"):
        AutoencoderModel(score_mode="mean")
    with pytest.raises(ConfigError, match="topk_ratio"):
        AutoencoderModel(score_mode="topk", topk_ratio=0)
    with pytest.raises(ConfigError, match="blur_sigma"):
        AutoencoderModel(blur_sigma=-1)
    with pytest.raises(ConfigError, match="depth"):
        AutoencoderModel(depth=0)
    with pytest.raises(BackboneError, match="unknown layer"):
        AutoencoderModel(backbone="resnet18", layer="layer9")


@pytest.mark.parametrize("name, trainer_class, normalize, input_name, beta", [
    ("autoencoder", AutoencoderTrainer, False, "pixels", None),
    ("autoencoder_features", AutoencoderTrainer, True, "layer2", None),
    ("vae", VaeTrainer, False, "pixels", 0.01),
    ("vae_features", VaeTrainer, True, "layer2", 0.01),
])
def test_configs_build_their_trainers(name, trainer_class, normalize, input_name, beta):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    trainer = instantiate(cfg, backbone="resnet18", weights_path=None, _convert_="all")
    assert type(trainer) is trainer_class
    assert trainer.normalize_input is normalize and trainer.trainer_arguments == {"max_epochs": 30}
    summary = trainer.summary()
    assert summary["input"] == input_name and summary.get("beta") == beta
