# tests/test_dfm.py
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from defectvad.backbones.weights import resolve_weights
from defectvad.components.pca import PCA
from defectvad.errors import ConfigError
from defectvad.metrics.auroc import auroc
from defectvad.models.dfm.torch_model import DFMModel, SingleClassGaussian
from defectvad.models.dfm.trainer import DfmTrainer

from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_pca_keeps_anomalib_component_count_and_leaves_input_alone():
    torch.manual_seed(0)
    data = torch.randn(30, 12) * torch.linspace(3, 0.1, 12)
    original = data.clone()
    pca = PCA(n_components=0.9).fit(data)
    assert torch.equal(data, original)
    centred = (data - data.mean(0)).double().numpy()
    _, singular, v_t = np.linalg.svd(centred, full_matrices=False)
    ratios = np.cumsum(singular**2) / np.sum(singular**2)
    # the index of the first ratio reaching the level (anomalib's rule)
    count = int(np.nonzero(ratios >= 0.9)[0][0])
    assert pca.num_components.tolist() == [count]
    assert pca.singular_vectors.shape == (12, count)
    np.testing.assert_allclose(np.abs(pca.singular_vectors.numpy()), np.abs(v_t[:count].T), atol=1e-5)
    projected = pca.transform(data)
    np.testing.assert_allclose(projected.numpy(), centred @ pca.singular_vectors.double().numpy(), atol=1e-4)
    assert pca.inverse_transform(projected).shape == (30, 12)
    fixed = PCA(n_components=4)
    reduced = fixed.fit_transform(data)
    assert reduced.shape == (30, 4) and fixed.num_components.tolist() == [4]
    assert torch.equal(data, original)


def test_gaussian_scores_the_negative_log_likelihood_up_to_constants():
    torch.manual_seed(0)
    samples = torch.randn(200, 3, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64) + 1
    gaussian = SingleClassGaussian().fit(samples.T)
    queries = torch.randn(5, 3, dtype=torch.float64)
    covariance = torch.cov(samples.T, correction=0)
    delta = queries - samples.mean(0)
    expected = (delta @ torch.linalg.inv(covariance) * delta).sum(1) + torch.logdet(covariance)
    torch.testing.assert_close(gaussian.score_samples(queries), expected)


def test_state_dict_names_follow_anomalib_and_bad_score_type_is_refused():
    model = DFMModel(backbone="resnet18", layer="layer3")
    names = set(model.state_dict())
    assert {"pca_model.singular_vectors", "pca_model.mean", "pca_model.num_components", "gaussian_model.mean_vec",
            "gaussian_model.u_mat", "gaussian_model.sigma_mat"} <= names
    assert "feature_extractor.feature_extractor.layer3.1.conv2.weight" in names
    assert not any("layer4" in name for name in names)
    with pytest.raises(ConfigError, match="fre, nll"):
        DFMModel(backbone="resnet18", score_type="mahalanobis")


def fitted_model(score_type, backbone="efficientnet_lite0"):
    torch.manual_seed(0)
    model = DFMModel(backbone=backbone, layer="layer3", score_type=score_type).train()
    images = torch.stack([item["image"] for item in StripesDataset(16)])
    for chunk in images.split(8):
        model(chunk)
    model.fit()
    return model.eval()


def test_fre_score_is_the_reconstruction_error_and_map_sums_to_it():
    model = fitted_model("fre")
    assert model.memory_bank == []
    images = torch.stack([item["image"] for item in StripesDataset(4, anomalous_every=2, seed=1)])
    features, shapes = model.get_features(images)
    # efficientnet_lite0 layer3: 112 channels at stride 16, pooled by 4: 1x1
    assert shapes == (4, 112, 1, 1)
    mean, vectors = model.pca_model.mean, model.pca_model.singular_vectors
    centred = features - mean
    expected = ((centred - centred @ vectors @ vectors.T) ** 2).sum(1)
    score, score_map = model.score(features, shapes)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score_map.sum(dim=(1, 2, 3)), score, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        outputs = model(images)
    assert outputs["pred_score"].shape == (4,) and outputs["anomaly_map"].shape == (4, 1, 64, 64)
    assert outputs["pred_score"][0] > outputs["pred_score"][1]


def test_fre_score_is_measured_from_the_training_mean():
    # resnet18's layer3 ends in a ReLU, so its features lie far from 0 (random efficientnet_lite0's do not)
    model = fitted_model("fre", backbone="resnet18")
    train = torch.stack([item["image"] for item in StripesDataset(16)])
    images = torch.stack([item["image"] for item in StripesDataset(2, anomalous_every=2, seed=1)])
    mean = model.get_features(train)[0].mean(0)
    assert mean.abs().max() > 0.1
    features, shapes = model.get_features(images)
    vectors = model.pca_model.singular_vectors
    centred = features - mean
    expected = ((centred - centred @ vectors @ vectors.T) ** 2).sum(1)
    torch.testing.assert_close(model.score(features, shapes)[0], expected, rtol=1e-4, atol=1e-5)


def test_nll_score_gives_a_constant_map():
    model = fitted_model("nll")
    images = torch.stack([item["image"] for item in StripesDataset(2, anomalous_every=2, seed=1)])
    with torch.no_grad():
        outputs = model(images)
    k = model.pca_model.num_components.item()
    assert model.gaussian_model.mean_vec.shape == (k,)
    # the Gaussian is fitted on the projected training features, which are centred
    assert model.gaussian_model.mean_vec.abs().max() < 1e-4
    assert torch.equal(outputs["anomaly_map"], outputs["pred_score"].reshape(2, 1, 1, 1).expand(2, 1, 64, 64))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("dfm") / "weights"
    torch.manual_seed(0)
    # the demo backbone with its ImageNet weights (shipped in a Python package)
    trainer = DfmTrainer(backbone="efficientnet_lite0", pooling_kernel_size=1,
                         weights_path=resolve_weights("efficientnet_lite0"))
    trainer.configure_engine(weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(StripesDataset(24), batch_size=8, shuffle=True))
    return trainer, DataLoader(StripesDataset(12, anomalous_every=2, seed=1), batch_size=6), weights_dir


def test_one_pass_fit_and_predict_separate_anomalies(fitted):
    trainer, test_loader, _ = fitted
    assert trainer.max_epochs == 1 and trainer.optimizer is None
    assert trainer.model.pca_model.singular_vectors.shape == (112 * 4 * 4, trainer.summary()["pca_components"])
    predictions = trainer.predict(test_loader)
    assert predictions["anomaly_map"].shape == (12, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    assert auroc(predictions["anomaly_map"].flatten(), predictions["mask"].flatten()) >= 0.9


def test_config_builds_anomalib_defaults():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "dfm.yaml")
    trainer = instantiate(cfg, backbone="resnet50", weights_path=None, _convert_="all")
    assert isinstance(trainer, DfmTrainer)
    model = trainer.model
    assert (model.layer, model.pooling_kernel_size, model.n_components, model.score_type) == ("layer3", 4, 0.97, "fre")
    assert model.feature_extractor.out_dims == [1024]
