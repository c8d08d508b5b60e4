# tests/test_dfkde.py
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import gaussian_kde
from torch.utils.data import DataLoader

from defectvad.backbones.weights import resolve_weights
from defectvad.components.gaussian_kde import GaussianKDE
from defectvad.components.kde_classifier import KDEClassifier
from defectvad.errors import ConfigError, TrainingError
from defectvad.metrics.auroc import auroc
from defectvad.models.dfkde.torch_model import DfkdeModel
from defectvad.models.dfkde.trainer import DfkdeTrainer

from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_kde_matches_scipy_with_scotts_bandwidth():
    generator = np.random.default_rng(0)
    points = generator.normal(size=(300, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]])
    queries = generator.normal(size=(7, 3))
    kde = GaussianKDE().fit(torch.tensor(points))
    expected = gaussian_kde(points.T).evaluate(queries.T)
    np.testing.assert_allclose(kde(torch.tensor(queries)).numpy(), expected, rtol=1e-10)


def test_classifier_maps_log_likelihood_to_anomaly_probability():
    torch.manual_seed(0)
    classifier = KDEClassifier(n_pca_components=4, max_training_points=50)
    classifier.fit(torch.randn(80, 10))
    # at most max_training_points vectors are kept, in n_pca_components dimensions
    assert classifier.kde_model.dataset.shape == (50, 4)
    assert classifier.pca_model.singular_vectors.shape == (10, 4)
    queries = torch.randn(5, 10)
    log_likelihood = classifier.compute_kde_scores(queries, as_log_likelihood=True)
    expected = 1 / (1 + torch.exp(0.05 * (log_likelihood - 12)))
    assert torch.allclose(classifier(queries), expected)
    # far from the training data: a lower likelihood, a higher probability of an anomaly
    assert classifier(queries * 50).min() > classifier(queries).max()
    with pytest.raises(TrainingError, match="at least 16 training images"):
        KDEClassifier().fit(torch.randn(8, 32))
    with pytest.raises(ConfigError, match="scale, norm"):
        KDEClassifier(feature_scaling_method="minmax")


def test_norm_scaling_puts_training_vectors_on_the_unit_sphere():
    torch.manual_seed(0)
    classifier = KDEClassifier(n_pca_components=3, feature_scaling_method="norm")
    scaled, _ = classifier.pre_process(torch.randn(6, 3) * 5)
    assert torch.allclose(scaled.norm(dim=1), torch.ones(6))
    classifier = KDEClassifier(n_pca_components=3)
    scaled, _ = classifier.pre_process(torch.randn(6, 3) * 5)
    assert scaled.norm(dim=1).max().item() == pytest.approx(1.0)


def test_state_dict_names_follow_anomalib():
    model = DfkdeModel(backbone="resnet18")
    names = set(model.state_dict())
    assert {"classifier.max_length", "classifier.pca_model.singular_vectors", "classifier.pca_model.mean",
            "classifier.pca_model.num_components", "classifier.kde_model.bw_transform", "classifier.kde_model.dataset",
            "classifier.kde_model.norm"} <= names
    assert "feature_extractor.feature_extractor.layer4.1.bn2.weight" in names
    assert not any(".fc." in name for name in names)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("dfkde") / "weights"
    torch.manual_seed(0)
    # the demo backbone with its ImageNet weights (shipped in a Python package)
    trainer = DfkdeTrainer(backbone="efficientnet_lite0", weights_path=resolve_weights("efficientnet_lite0"))
    trainer.configure_engine(weights_dir=weights_dir, progress_bar=False)
    trainer.fit(DataLoader(StripesDataset(24), batch_size=8, shuffle=True))
    return trainer, DataLoader(StripesDataset(12, anomalous_every=2, seed=1), batch_size=6), weights_dir


def test_one_pass_fit_and_image_level_predictions(fitted):
    trainer, test_loader, _ = fitted
    assert trainer.max_epochs == 1 and trainer.optimizer is None
    assert trainer.model.memory_bank == []
    # 24 pooled efficientnet_lite0 layer4 vectors (320 channels), reduced to 16 dimensions
    assert trainer.summary() == {"kde_points": 24}
    assert trainer.model.classifier.pca_model.singular_vectors.shape == (320, 16)
    predictions = trainer.predict(test_loader)
    scores, maps = predictions["pred_score"], predictions["anomaly_map"]
    assert scores.shape == (12,) and maps.shape == (12, 1, 64, 64)
    assert ((scores > 0) & (scores <= 1)).all()
    # no localisation: the map is the image score everywhere
    assert torch.equal(maps, scores.reshape(12, 1, 1, 1).expand(12, 1, 64, 64))
    assert auroc(scores, predictions["label"]) >= 0.9


def test_config_builds_anomalib_defaults():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "dfkde.yaml")
    trainer = instantiate(cfg, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(trainer, DfkdeTrainer)
    classifier = trainer.model.classifier
    assert trainer.model.layers == ["layer4"]
    assert (classifier.n_pca_components, classifier.feature_scaling_method, classifier.max_training_points) == (
        16, "scale", 40000)
