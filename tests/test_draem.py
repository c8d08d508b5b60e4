# tests/test_draem.py
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.components.perlin import PerlinAnomalyGenerator, generate_perlin_mask, generate_perlin_noise
from defectvad.components.ssim import SSIMLoss, ssim
from defectvad.components.textures import SyntheticTextures, TextureFolder
from defectvad.errors import ConfigError, DatasetError
from defectvad.metrics.auroc import auroc
from defectvad.models.draem.loss import DraemLoss, FocalLoss
from defectvad.models.draem.torch_model import DraemModel
from defectvad.models.draem.trainer import DraemTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = {"reconstructive_width": 8, "discriminative_width": 8}


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


def make_trainer(**kwargs):
    torch.manual_seed(0)
    return DraemTrainer(anomaly_source="synthetic", **{**TINY, **kwargs})


def test_map_is_the_anomalous_class_probability_of_the_discriminative_network():
    torch.manual_seed(0)
    model = DraemModel(**TINY).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
        reconstruction = model.reconstructive_subnetwork(images)
        logits = model.discriminative_subnetwork(torch.cat([images, reconstruction], dim=1))
    # softmax over (normal, anomalous): p = 1 / (1 + exp(normal - anomalous))
    expected = torch.sigmoid(logits[:, 1:] - logits[:, :1])
    torch.testing.assert_close(outputs["anomaly_map"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    model.train()
    reconstruction, prediction = model(images)
    assert reconstruction.shape == (2, 3, 64, 64) and prediction.shape == (2, 2, 64, 64)


def test_state_dict_names_and_shapes_follow_anomalib():
    # shapes only: the meta device allocates nothing
    with torch.device("meta"):
        state = DraemModel().state_dict()
        sspcab = DraemModel(sspcab=True).state_dict()
    assert len(state) == 347
    assert {key.split(".")[0] for key in state} == {"reconstructive_subnetwork", "discriminative_subnetwork"}
    expected = {
        "reconstructive_subnetwork.encoder.block1.0.weight": (128, 3, 3, 3),
        "reconstructive_subnetwork.encoder.block5.3.weight": (1024, 1024, 3, 3),
        "reconstructive_subnetwork.decoder.db1.3.weight": (512, 1024, 3, 3),
        "reconstructive_subnetwork.decoder.fin_out.0.weight": (3, 128, 3, 3),
        "discriminative_subnetwork.encoder_segment.block1.0.weight": (64, 6, 3, 3),
        "discriminative_subnetwork.decoder_segment.db_b.0.weight": (512, 1024, 3, 3),
        "discriminative_subnetwork.decoder_segment.fin_out.0.weight": (2, 64, 3, 3),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert sspcab["reconstructive_subnetwork.encoder.block5.masked_conv4.weight"].shape == (1024, 1024, 1, 1)
    assert sspcab["reconstructive_subnetwork.encoder.block5.attention_module.fc1.weight"].shape == (128, 1024)


def reference_ssim(first, second):
    # a direct 2-D Gaussian window over reflected borders, in float64
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    window = torch.outer(g, g) / g.sum() ** 2
    kernel = window.expand(first.shape[1], 1, 11, 11)

    def mean(images):
        return F.conv2d(F.pad(images, (5, 5, 5, 5), mode="reflect"), kernel, groups=first.shape[1])

    mu1, mu2 = mean(first), mean(second)
    var1, var2, cov = mean(first**2) - mu1**2, mean(second**2) - mu2**2, mean(first * second) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    return (2 * mu1 * mu2 + c1) * (2 * cov + c2) / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2))


def test_ssim_matches_a_direct_computation():
    torch.manual_seed(0)
    first, second = torch.rand(2, 3, 24, 20, dtype=torch.float64), torch.rand(2, 3, 24, 20, dtype=torch.float64)
    assert torch.allclose(ssim(first, second), reference_ssim(first, second), rtol=1e-9, atol=1e-12)
    loss = SSIMLoss()
    assert loss(first, first).item() == pytest.approx(0.0, abs=1e-9)
    assert loss(first, second).item() == pytest.approx((1 - reference_ssim(first, second)).mean().item(), rel=1e-9)
    # two flat images: SSIM reduces to the luminance term
    flat = ssim(torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6))
    assert torch.allclose(flat, torch.tensor((2 * 0.2 * 0.6 + 1e-4) / (0.04 + 0.36 + 1e-4)), rtol=1e-4)


def test_focal_loss_weights():
    torch.manual_seed(0)
    prediction = 2 * torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.7).long()
    p = torch.softmax(prediction, 1).gather(1, target[:, None])[:, 0]
    per_pixel = -((1 - p) ** 2) * torch.log(p)
    assert torch.allclose(FocalLoss()(prediction, target), per_pixel.mean(), rtol=1e-5)
    assert torch.allclose(FocalLoss(alpha=0.5)(prediction, target), per_pixel.mean() / 4, rtol=1e-5)
    # alpha=1 (anomalib 2.x with kornia >= 0.7): normal pixels add nothing
    assert torch.allclose(FocalLoss(alpha=1.0)(prediction, target), (per_pixel * target).mean() / 2, rtol=1e-5)
    assert FocalLoss(alpha=1.0)(prediction, torch.zeros_like(target)).item() == 0.0
    image, reconstruction = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    prediction = torch.randn(2, 2, 16, 16)
    expected = (F.mse_loss(reconstruction, image) + SSIMLoss()(reconstruction, image)
                + FocalLoss()(prediction, mask[:, 0].long()))
    assert torch.allclose(DraemLoss()(image, reconstruction, mask, prediction), expected, rtol=1e-6)


def test_perlin_noise_is_zero_on_its_lattice_and_masks_are_blobs():
    torch.manual_seed(0)
    noise = generate_perlin_noise(64, 64, scale=(2, 4))
    assert noise.shape == (64, 64)
    # gradient noise vanishes where the lattice lies: every 32 rows and every 16 columns
    assert noise[::32, ::16].abs().max().item() < 1e-6
    assert noise.abs().max().item() <= math.sqrt(2) and noise.std().item() > 0.1
    torch.manual_seed(1)
    first = generate_perlin_mask(64, 64)[1]
    torch.manual_seed(1)
    assert torch.equal(first, generate_perlin_mask(64, 64)[1])
    assert set(first.unique().tolist()) <= {0.0, 1.0} and 0 < first.mean().item() < 1


def test_augmenter_pastes_textures_inside_the_mask_only():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    augmenter = PerlinAnomalyGenerator(SyntheticTextures(), probability=1.0, blend_factor=(0.5, 0.5))
    augmented, masks = augmenter(images)
    assert augmented.shape == images.shape and masks.shape == (4, 1, 32, 32)
    assert (masks.flatten(1).sum(1) > 0).all()
    outside = (masks == 0).expand_as(images)
    assert torch.equal(augmented[outside], images[outside])
    # inside: half the image plus half a texture in [0, 1]
    texture_half = (augmented - 0.5 * images)[~outside]
    assert texture_half.min() >= -1e-6 and texture_half.max() <= 0.5 + 1e-6
    unchanged, empty = PerlinAnomalyGenerator(SyntheticTextures(), probability=0.0)(images)
    assert torch.equal(unchanged, images) and empty.sum() == 0


def test_texture_sources(tmp_path):
    torch.manual_seed(0)
    textures = SyntheticTextures()
    samples = [textures.sample(20, 30) for _ in range(6)]
    assert all(s.shape == (3, 20, 30) and s.dtype == torch.uint8 for s in samples)
    assert all(s.float().std() > 0 for s in samples)
    (tmp_path / "banded").mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(tmp_path / "banded" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = TextureFolder(tmp_path)
    assert len(folder) == 1
    texture = folder.sample(16, 24)
    assert texture.shape == (3, 16, 24) and texture.unique().tolist() == [200]


def test_missing_textures_and_bad_choices_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="model.anomaly_source=synthetic") as error:
        DraemTrainer(anomaly_source_path=tmp_path / "dtd", **TINY)
    assert str(tmp_path / "dtd") in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        DraemTrainer(anomaly_source_path=tmp_path / "empty", **TINY)
    with pytest.raises(ConfigError, match="dtd, synthetic"):
        DraemTrainer(anomaly_source="imagenet", **TINY)
    trainer = make_trainer()
    trainer.setup_optimizers()
    with pytest.raises(ConfigError, match="ImageNet-normalised"):
        trainer.on_train_batch_start({"image": torch.rand(2, 3, 32, 32) - 0.5}, 0)


def test_optimizer_schedule_and_summary_follow_anomalib():
    trainer = make_trainer()
    assert trainer.trainer_arguments == {"max_epochs": 700, "gradient_clip_val": 0}
    assert trainer.normalize_input is False
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.0001
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in trainer.model.parameters()]
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert (dict(scheduler.milestones), scheduler.gamma) == ({400: 1, 600: 1}, 0.1)
    summary = trainer.summary()
    assert summary["anomaly_source"] == "synthetic" and summary["anomaly_source_path"] is None
    assert summary["textures"] == "generated: perlin, stripes, checker"


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    trainer = make_trainer(lr=0.001)
    trainer.setup_optimizers()
    trainer.model.train()
    batch = {"image": torch.stack([item["image"] for item in make_items(4)])}
    losses = []
    for step in range(4):
        # the same synthetic anomalies at every step
        torch.manual_seed(1)
        loss = trainer.training_step(batch, step)["loss"]
        trainer.backward_and_step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sspcab_adds_its_reconstruction_term():
    torch.manual_seed(0)
    trainer = DraemTrainer(anomaly_source="synthetic", enable_sspcab=True, **TINY)
    trainer.model.train()
    batch = {"image": torch.rand(2, 3, 32, 32)}
    torch.manual_seed(1)
    loss = trainer.training_step(batch, 0)["loss"]
    activations = trainer.sspcab_activations
    assert activations["input"].shape == activations["output"].shape == (2, 64, 2, 2)
    torch.manual_seed(1)
    augmented, mask = trainer.augmenter(batch["image"])
    reconstruction, prediction = trainer.model(augmented)
    expected = trainer.loss(batch["image"], reconstruction, mask, prediction) + 0.1 * F.mse_loss(
        activations["input"], activations["output"])
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    weights_dir = tmp_path_factory.mktemp("draem") / "weights"
    # a tenth of anomalib's widths at 32x32 and a higher learning rate: a schedule of seconds on a CPU
    trainer = make_trainer(lr=0.003).configure_engine(max_epochs=40, weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(make_items(16, size=32), batch_size=8, shuffle=True))
    torch.set_num_threads(threads)
    return trainer, DataLoader(make_items(16, anomalous_every=2, seed=1, size=32), batch_size=8), weights_dir


def test_fit_and_predict_separate_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert len(trainer.train_losses) == 40 and trainer.train_losses[-1] < trainer.train_losses[0] / 2
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (16, 1, 32, 32)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9


def test_config_resolves_the_dtd_folder_and_builds_a_trainer(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=draem", f"paths.dataset_dir={tmp_path}"])
    assert cfg.model.anomaly_source_path == f"{tmp_path}/dtd"
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg.model, backbone="efficientnet_lite0", weights_path=None, _convert_="all")
    # the entry point reports the DatasetError that Hydra wraps
    cause = error.value.__cause__
    assert isinstance(cause, DatasetError) and f"no images in {tmp_path}/dtd" in str(cause)
    trainer = instantiate(cfg.model, backbone="efficientnet_lite0", weights_path=None, anomaly_source="synthetic",
                          **TINY, _convert_="all")
    assert isinstance(trainer, DraemTrainer)
    settings = (trainer.lr, trainer.milestones, trainer.gamma, trainer.augmenter.blend_factor)
    assert settings == (0.0001, [400, 600], 0.1, (0.1, 1.0))
    assert trainer.focal_alpha is None
