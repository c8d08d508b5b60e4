# tests/test_padim.py
import numpy as np
import torch
from scipy.spatial.distance import mahalanobis
from torch.nn import functional as F

from defectvad.components.blur import GaussianBlur2d
from defectvad.components.multi_variate_gaussian import MultiVariateGaussian
from defectvad.metrics.evaluation import compute_metrics
from defectvad.models.padim.torch_model import PadimModel
from defectvad.models.padim.trainer import PadimTrainer


def make_images(count, anomalous, seed):
    generator = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.randn(count, 3, 64, 64, generator=generator)
    masks = torch.zeros(count, 1, 64, 64)
    if anomalous:
        images[:, :, 20:36, 24:40] += 2.5
        masks[:, :, 20:36, 24:40] = 1
    return images, masks


def fitted_model():
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18")
    model.train()
    model(make_images(16, False, 0)[0])
    model.fit()
    return model.eval()


def test_score_is_the_map_maximum_and_names_follow_anomalib():
    model = fitted_model()
    with torch.no_grad():
        out = model(make_images(2, True, 1)[0])
    assert torch.allclose(out["pred_score"], out["anomaly_map"].amax(dim=(-2, -1)).reshape(-1))
    state = model.state_dict()
    assert state["idx"].shape == (100,)
    assert state["gaussian.mean"].shape == (100, 16 * 16)
    assert state["gaussian.inv_covariance"].shape == (16 * 16, 100, 100)
    assert state["anomaly_map_generator.blur.kernel"].shape == (1, 1, 33, 33)
    assert "feature_extractor.feature_extractor.conv1.weight" in state
    assert not any("layer4" in key for key in state)


def test_gaussian_matches_per_patch_covariance():
    embedding = torch.randn(10, 4, 3, 3, dtype=torch.float64)
    gaussian = MultiVariateGaussian()
    mean, inv_covariance = gaussian.fit(embedding)
    vectors = embedding.reshape(10, 4, 9).numpy()
    for patch in range(9):
        covariance = np.cov(vectors[:, :, patch], rowvar=False) + (0.01 + 1e-5) * np.eye(4)
        np.testing.assert_allclose(inv_covariance[patch].numpy(), np.linalg.inv(covariance), rtol=1e-9)
        np.testing.assert_allclose(mean[:, patch].numpy(), vectors[:, :, patch].mean(0), rtol=1e-9)


def test_map_is_the_mahalanobis_distance_of_each_patch():
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", n_features=6).train()
    with torch.no_grad():
        train = model(make_images(12, False, 0)[0]).double().numpy()
    model.fit()
    model.eval()
    images = make_images(2, True, 1)[0]
    with torch.no_grad():
        out = model(images)
        test = model.generate_embedding(model.feature_extractor(images)).double().numpy()
    # 16 x 16 patches (layer1 of resnet18 at 64 px), each with its own mean and regularised covariance
    distances = np.zeros((2, 1, 16, 16))
    for y in range(16):
        for x in range(16):
            samples = train[:, :, y, x]
            inverse = np.linalg.inv(np.cov(samples, rowvar=False) + (0.01 + 1e-5) * np.eye(6))
            for index in range(2):
                distances[index, 0, y, x] = mahalanobis(test[index, :, y, x], samples.mean(0), inverse)
    resized = F.interpolate(torch.tensor(distances, dtype=torch.float32), size=(64, 64), mode="bilinear",
                            align_corners=False)
    torch.testing.assert_close(out.anomaly_map, model.anomaly_map_generator.blur(resized), rtol=1e-3, atol=1e-5)


def test_blur_kernel_is_normalised_gaussian_and_keeps_size():
    blur = GaussianBlur2d(sigma=4)
    assert blur.kernel.shape == (1, 1, 33, 33)
    assert abs(blur.kernel.sum().item() - 1) < 1e-6
    assert blur.kernel[0, 0, 16, 16] == blur.kernel.max()
    image = torch.zeros(1, 1, 40, 40)
    image[0, 0, 20, 20] = 1
    blurred = blur(image)
    assert blurred.shape == image.shape
    assert abs(blurred.sum().item() - 1) < 1e-5


def test_padim_separates_defects_from_normal_images():
    model = fitted_model()
    normal, normal_masks = make_images(6, False, 2)
    defective, defect_masks = make_images(6, True, 3)
    with torch.no_grad():
        out = model(torch.cat([normal, defective]))
    labels = torch.tensor([0] * 6 + [1] * 6)
    metrics = compute_metrics(out["pred_score"], labels, out["anomaly_map"][:, 0], torch.cat([normal_masks, defect_masks])[:, 0])
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.9


def test_trainer_fits_in_one_epoch():
    trainer = PadimTrainer(backbone="resnet18").configure_engine()
    assert trainer.max_epochs == 1
    images = make_images(8, False, 5)[0]
    loader = torch.utils.data.DataLoader([{"image": image, "label": 0, "mask": torch.zeros(1, 64, 64),
                                           "image_path": str(i)} for i, image in enumerate(images)], batch_size=4)
    trainer.fit(loader)
    assert trainer.model.gaussian.mean.shape == (100, 256)
    assert trainer.model.memory_bank == []


def test_more_epochs_asked_of_a_one_pass_model_run_one_pass():
    # a sweep over several models sets trainer.max_epochs for the gradient ones: PaDiM still collects once
    trainer = PadimTrainer(backbone="resnet18").configure_engine(max_epochs=10)
    assert trainer.max_epochs == 1
    passes = []
    trainer.on_train_epoch_start = lambda: passes.append(trainer.current_epoch)
    images = make_images(4, False, 5)[0]
    loader = torch.utils.data.DataLoader([{"image": image, "label": 0, "mask": torch.zeros(1, 64, 64),
                                           "image_path": str(i)} for i, image in enumerate(images)], batch_size=4)
    trainer.fit(loader)
    assert passes == [0] and trainer.current_epoch == 1
