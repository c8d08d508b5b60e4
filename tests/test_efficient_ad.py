# tests/test_efficient_ad.py
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.errors import BackboneError, ConfigError, DatasetError
from defectvad.metrics.evaluation import compute_metrics
from defectvad.models.efficient_ad.torch_model import EfficientAdModel, SmallPatchDescriptionNetwork
from defectvad.models.efficient_ad.trainer import TEACHER_URL, EfficientAdTrainer

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256
# a narrow teacher keeps the tests fast; the architecture is otherwise the default small one
CHANNELS = 16


def make_images(count, anomalous, seed, size=SIZE):
    generator = torch.Generator().manual_seed(seed)
    images = (0.5 + 0.1 * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)
    masks = torch.zeros(count, 1, size, size)
    if anomalous:
        images[:, :, 96:144, 112:160] = 1.0
        masks[:, :, 96:144, 112:160] = 1
    return images, masks


class ImageList(list):
    # a list of samples that, like our datasets, tells how it transforms
    def __init__(self, samples, normalize=False):
        super().__init__(samples)
        self.transform = type("Transform", (), {"normalize": normalize})()


def make_loader(images, masks, label, batch_size, normalize=False):
    samples = ImageList([{"image": image, "label": label, "mask": mask, "image_path": str(i)}
                         for i, (image, mask) in enumerate(zip(images, masks))], normalize)
    return DataLoader(samples, batch_size=batch_size)


def write_teacher(folder, model_size="small", out_channels=CHANNELS):
    torch.manual_seed(7)
    teacher = SmallPatchDescriptionNetwork(out_channels)
    (folder / "efficientad_pretrained_weights").mkdir(parents=True, exist_ok=True)
    path = folder / "efficientad_pretrained_weights" / f"pretrained_teacher_{model_size}.pth"
    torch.save(teacher.state_dict(), path)
    return teacher.state_dict()


def write_imagenette(folder, count=3):
    rng = np.random.default_rng(0)
    for i in range(count):
        klass = folder / "train" / f"n0{i}"
        klass.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(klass / f"img{i}.JPEG")
    return folder


SMALL_SHAPES = {
    "teacher.conv1.weight": (128, 3, 4, 4), "teacher.conv2.weight": (256, 128, 4, 4),
    "teacher.conv3.weight": (256, 256, 3, 3), "teacher.conv4.weight": (384, 256, 4, 4), "teacher.conv4.bias": (384,),
    "student.conv1.weight": (128, 3, 4, 4), "student.conv4.weight": (768, 256, 4, 4), "student.conv4.bias": (768,),
    "ae.encoder.enconv1.weight": (32, 3, 4, 4), "ae.encoder.enconv6.weight": (64, 64, 8, 8),
    "ae.decoder.deconv1.weight": (64, 64, 4, 4), "ae.decoder.deconv7.weight": (64, 64, 3, 3),
    "ae.decoder.deconv8.weight": (384, 64, 3, 3),
    "mean_std.mean": (1, 384, 1, 1), "mean_std.std": (1, 384, 1, 1),
    "quantiles.qa_st": (), "quantiles.qb_st": (), "quantiles.qa_ae": (), "quantiles.qb_ae": (),
}


def test_state_dict_names_and_shapes_as_anomalib():
    small = EfficientAdModel().state_dict()
    # 4 convolutions in each PDN, 6 + 8 in the autoencoder, weight and bias each, then 2 + 4 statistics
    assert len(small) == 2 * (4 + 4 + 6 + 8) + 6
    for key, shape in SMALL_SHAPES.items():
        assert tuple(small[key].shape) == shape, key
    medium = EfficientAdModel(model_size="medium").state_dict()
    assert len(medium) == 2 * (6 + 6 + 6 + 8) + 6
    assert tuple(medium["teacher.conv6.weight"].shape) == (384, 384, 1, 1)
    assert tuple(medium["student.conv5.weight"].shape) == (768, 512, 4, 4)
    assert not any(p.requires_grad for p in EfficientAdModel().teacher.parameters())


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = EfficientAdModel(teacher_out_channels=CHANNELS).train()
    images = make_images(1, False, 2)[0]
    optimizer = torch.optim.Adam(list(model.student.parameters()) + list(model.ae.parameters()), lr=1e-4)

    def loss():
        # the same augmentation and dropout draws each time; no ImageNet penalty here (the fit below has it)
        torch.manual_seed(5)
        return sum(model(images))

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert 0 < after.item() < before.item()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("efficient_ad")
    teacher_state = write_teacher(folder / "backbones")
    trainer = EfficientAdTrainer(teacher_out_channels=CHANNELS, teacher_dir=folder / "backbones/efficientad_pretrained_weights",
                                 imagenet_dir=write_imagenette(folder / "imagenette2"))
    trainer.configure_engine(max_steps=1, weights_dir=folder / "weights")
    torch.manual_seed(0)
    # batch size 2: the trainer still takes one image per step
    trainer.fit(make_loader(*make_images(2, False, 10), 0, batch_size=2))
    normal, normal_masks = make_images(2, False, 11)
    defective, defect_masks = make_images(2, True, 12)
    test_loader = DataLoader(
        [{"image": image, "label": label, "mask": mask, "image_path": str(i)}
         for i, (image, mask, label) in enumerate(zip(torch.cat([normal, defective]),
                                                     torch.cat([normal_masks, defect_masks]), [0, 0, 1, 1]))],
        batch_size=4)
    return trainer, teacher_state, trainer.predict(test_loader), folder


def test_fit_loads_teacher_computes_statistics_and_separates_defects(fitted):
    trainer, teacher_state, predictions, _ = fitted
    model = trainer.model
    for key, value in teacher_state.items():
        assert torch.equal(model.teacher.state_dict()[key], value)
    assert trainer.steps_per_epoch == 2 and trainer.global_step == 1
    assert model.mean_std.is_set() and (model.mean_std["std"] > 0).all()
    q = model.quantiles
    assert 0 < q["qa_st"] < q["qb_st"] and 0 < q["qa_ae"] < q["qb_ae"]
    facts = trainer.summary()
    assert facts["imagenet_penalty"] is True and facts["teacher"].endswith("pretrained_teacher_small.pth")
    assert facts["lr_decay_step"] == 1
    assert predictions["pred_score"].shape == (4,)
    assert predictions["anomaly_map"].shape == (4, 1, SIZE, SIZE)
    torch.testing.assert_close(predictions["pred_score"], predictions["anomaly_map"].amax(dim=(-3, -2, -1)))
    metrics = compute_metrics(predictions["pred_score"], predictions["label"], predictions["anomaly_map"][:, 0],
                              predictions["mask"][:, 0])
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.9


def test_maps_are_quantile_normalised_halves(fitted):
    trainer, _, predictions, _ = fitted
    q = {key: value.item() for key, value in trainer.model.quantiles.named_buffers()}
    with torch.no_grad():
        map_st, map_ae = trainer.model.get_maps(make_images(2, True, 12)[0][1:], normalize=False)
    expected = 0.05 * (map_st - q["qa_st"]) / (q["qb_st"] - q["qa_st"]) + 0.05 * (map_ae - q["qa_ae"]) / (q["qb_ae"] - q["qa_ae"])
    torch.testing.assert_close(predictions["anomaly_map"][3:], expected, rtol=1e-4, atol=1e-6)
    # without padding the 56x56 feature map is padded by 4 back to 64x64 (pad_maps), so the border is constant
    assert torch.allclose(map_st[0, 0, 0], map_st[0, 0, 0, :1].expand(SIZE))


def test_raw_maps_are_squared_distances_to_the_teacher_and_the_autoencoder(fitted):
    model = fitted[0].model.eval()
    image = make_images(2, True, 12)[0][1:]
    with torch.no_grad():
        map_st, map_ae = model.get_maps(image, normalize=False)
        teacher = (model.teacher(image) - model.mean_std["mean"]) / model.mean_std["std"]
        student = model.student(image)
        autoencoder = model.ae(image, image.shape[-2:])

    def to_image(squared):
        # channel mean, padded by 4 and resized to the image
        return F.interpolate(F.pad(squared.mean(1, keepdim=True), (4, 4, 4, 4)), size=(SIZE, SIZE), mode="bilinear")

    torch.testing.assert_close(map_st, to_image((teacher - student[:, :CHANNELS]) ** 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(map_ae, to_image((autoencoder - student[:, CHANNELS:]) ** 2), rtol=1e-5, atol=1e-6)


def test_missing_teacher_names_file_folder_and_download(tmp_path):
    with pytest.raises(BackboneError) as error:
        EfficientAdTrainer(model_size="medium", teacher_dir=tmp_path / "efficientad_pretrained_weights")
    message = str(error.value)
    assert "pretrained_teacher_medium.pth" in message and str(tmp_path / "efficientad_pretrained_weights") in message
    assert TEACHER_URL in message and "model.pretrained_teacher=false" in message
    assert TEACHER_URL.endswith("/efficientad_pretrained_weights/efficientad_pretrained_weights.zip")


def build_from_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=efficient_ad", *overrides])
    try:
        return instantiate(cfg.model, backbone=cfg.backbone.name, weights_path=None, _convert_="all")
    except Exception as error:
        # hydra wraps what the constructor raised
        raise error.__cause__ or error


def test_default_config_needs_teacher_and_imagenette(tmp_path):
    with pytest.raises(BackboneError, match=f"pretrained_teacher_small.pth in {tmp_path}/efficientad_pretrained_weights"):
        build_from_config(f"paths.backbone_dir={tmp_path}", f"paths.dataset_dir={tmp_path}")
    write_teacher(tmp_path, out_channels=384)
    with pytest.raises(DatasetError, match=f"{tmp_path}/imagenette2 does not exist"):
        build_from_config(f"paths.backbone_dir={tmp_path}", f"paths.dataset_dir={tmp_path}")
    trainer = build_from_config(f"paths.backbone_dir={tmp_path}", "model.imagenet_dir=null")
    assert isinstance(trainer, EfficientAdTrainer) and trainer.normalize_input is False
    assert (trainer.lr, trainer.weight_decay, trainer.max_epochs, trainer.model_size) == (1e-4, 1e-5, 1, "small")
    assert (trainer.model.pad_maps, trainer.model.teacher_out_channels) == (True, 384)
    assert trainer.summary()["imagenet_penalty"] is False


def test_teacher_of_other_shape_is_refused(tmp_path):
    write_teacher(tmp_path, out_channels=8)
    with pytest.raises(BackboneError, match="does not hold a small EfficientAD teacher"):
        EfficientAdTrainer(teacher_out_channels=CHANNELS, teacher_dir=tmp_path / "efficientad_pretrained_weights")


def test_missing_imagenette_says_how_to_train_without_penalty(tmp_path):
    with pytest.raises(DatasetError) as error:
        EfficientAdTrainer(pretrained_teacher=False, imagenet_dir=tmp_path / "imagenette2")
    assert str(tmp_path / "imagenette2") in str(error.value) and "model.imagenet_dir=null" in str(error.value)
    trainer = EfficientAdTrainer(pretrained_teacher=False, imagenet_dir=None)
    assert trainer.summary()["imagenet_penalty"] is False
    assert trainer.summary()["teacher"].startswith("random")


def test_fit_refuses_normalised_or_small_images():
    trainer = EfficientAdTrainer(teacher_out_channels=CHANNELS, pretrained_teacher=False)
    with pytest.raises(ConfigError, match="transform.normalize=null"):
        trainer.fit(make_loader(*make_images(1, False, 0), 0, batch_size=1, normalize=True))
    with pytest.raises(ConfigError, match="at least 256x256"):
        trainer.fit(make_loader(*make_images(1, False, 0, size=128), 0, batch_size=1))
    with pytest.raises(ConfigError, match="small, medium"):
        EfficientAdModel(model_size="large")
