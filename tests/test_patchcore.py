# tests/test_patchcore.py
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from defectvad.errors import ConfigError, TrainingError
from defectvad.metrics.auroc import auroc
from defectvad.models.patchcore.torch_model import PatchcoreModel
from defectvad.models.patchcore.trainer import PatchcoreTrainer

ROOT = Path(__file__).resolve().parents[1]


class StripesDataset(Dataset):
    # normal images are noisy stripes; anomalous ones carry a bright square, marked in the mask
    def __init__(self, count, anomalous_every=0, seed=0):
        generator = torch.Generator().manual_seed(seed)
        stripes = (torch.arange(64) // 8 % 2).float().expand(64, 64)
        self.items = []
        for index in range(count):
            image = stripes.expand(3, 64, 64) + 0.1 * torch.randn(3, 64, 64, generator=generator)
            mask = torch.zeros(1, 64, 64)
            label = int(anomalous_every > 0 and index % anomalous_every == 0)
            if label:
                y, x = torch.randint(8, 40, (2,), generator=generator).tolist()
                image[:, y:y + 14, x:x + 14] = 3.0
                mask[:, y:y + 14, x:x + 14] = 1.0
            self.items.append({"image": image, "label": label, "mask": mask, "image_path": f"img{index}.png"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def fitted_model(backbone="resnet18", ratio=0.25, **kwargs):
    torch.manual_seed(0)
    model = PatchcoreModel(backbone=backbone, **kwargs).train()
    model(torch.randn(3, 3, 64, 64))
    model.subsample_embedding(ratio)
    return model.eval()


def test_default_configuration_is_anomalib_s():
    model = PatchcoreModel(backbone="resnet18")
    assert model.layers == ["layer2", "layer3"] and model.num_neighbors == 9
    names = model.state_dict().keys()
    assert {"memory_bank", "anomaly_map_generator.blur.kernel", "feature_extractor.feature_extractor.conv1.weight",
            "feature_extractor.feature_extractor.layer3.1.bn2.running_var"} <= set(names)
    assert not any("layer4" in name for name in names)
    # sigma 4: a 33 x 33 kernel
    assert model.anomaly_map_generator.blur.kernel.shape == (1, 1, 33, 33)


def test_training_collects_patch_embeddings():
    model = PatchcoreModel(backbone="resnet18").train()
    embedding = model(torch.randn(2, 3, 64, 64))
    # layer2 of resnet18 at 64 px: 8 x 8 patches of 128 + 256 channels
    assert embedding.shape == (2 * 8 * 8, 384)
    assert len(model.embedding_store) == 1


def test_image_score_is_the_reweighted_largest_patch_distance():
    model = PatchcoreModel(backbone="resnet18", num_neighbors=2)
    model.memory_bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    embedding = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    patch_scores = torch.tensor([[0.0, 4.0]])
    locations = torch.tensor([[0, 1]])
    # farthest patch (3, 4), score 4, nearest bank entry (1, 0); its 2 neighbours are (1, 0) and (0, 0),
    # at distances sqrt(20) and 5 from the patch: weight = 1 - softmax([sqrt(20), 5])[0]
    distances = torch.tensor([20.0**0.5, 5.0])
    expected = (1 - torch.softmax(distances, 0)[0]) * 4
    score = model.compute_anomaly_score(patch_scores, locations, embedding)
    assert torch.allclose(score, expected.reshape(1), atol=1e-5)
    model.num_neighbors = 1
    assert float(model.compute_anomaly_score(patch_scores, locations, embedding)) == 4.0


def test_patch_scores_are_nearest_bank_distances():
    model = fitted_model(num_neighbors=1)
    images = torch.randn(1, 3, 64, 64)
    output = model(images)
    with torch.no_grad():
        features = model.feature_extractor(images)
        features = {layer: model.feature_pooler(value) for layer, value in features.items()}
        embedding = model.reshape_embedding(model.generate_embedding(features))
    expected = torch.cdist(embedding, model.memory_bank).min(1).values.max()
    assert torch.allclose(output["pred_score"], expected.reshape(1), rtol=1e-4)


def test_prediction_needs_a_memory_bank():
    model = PatchcoreModel(backbone="resnet18").eval()
    with pytest.raises(TrainingError, match="memory bank is empty"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(TrainingError, match="no training images"):
        model.subsample_embedding(0.1)


@pytest.mark.parametrize("arguments, message", [
    ({"coreset_sampling_ratio": 0}, "coreset_sampling_ratio"),
    ({"coreset_sampling_ratio": 2}, "coreset_sampling_ratio"),
    ({"num_neighbors": 0}, "num_neighbors"),
])
def test_bad_settings_are_config_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        PatchcoreTrainer(backbone="resnet18", **arguments)


def test_fit_and_predict_separate_anomalies():
    config = OmegaConf.load(ROOT / "conf/model/patchcore.yaml")
    torch.manual_seed(0)
    trainer = instantiate(config, backbone="resnet18", weights_path=None, _convert_="all")
    assert isinstance(trainer, PatchcoreTrainer) and trainer.coreset_sampling_ratio == 0.1
    trainer.configure_engine(device="cpu", progress_bar=False)
    trainer.fit(DataLoader(StripesDataset(8), batch_size=4))
    summary = trainer.summary()
    assert summary["memory_bank_size"] == [int(8 * 64 * 0.1), 384]
    assert summary["coreset_s"] >= 0
    predictions = trainer.predict(DataLoader(StripesDataset(12, anomalous_every=2, seed=1), batch_size=4))
    assert predictions["anomaly_map"].shape == (12, 1, 64, 64)
    assert auroc(predictions["pred_score"], predictions["label"]) >= 0.9
    masks = predictions["mask"].flatten().bool()
    assert auroc(predictions["anomaly_map"].flatten(), masks) >= 0.8
