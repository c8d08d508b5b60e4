# tests/test_patch_knn.py
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError, TrainingError
from defectvad.models.patch_knn import torch_model
from defectvad.models.patch_knn.trainer import PatchKnnTrainer
from fakes import StripesDataset

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_scores(queries, bank):
    # (B, P, C) against (N, Q, C): for each query patch the Euclidean distance to its nearest bank patch
    return torch.stack([torch.cdist(query.double(), bank.reshape(-1, bank.shape[-1]).double()).amin(1)
                        for query in queries])


def make_trainer(learning_type):
    torch.manual_seed(0)
    return PatchKnnTrainer(backbone="resnet18", learning_type=learning_type).configure_engine(progress_bar=False)


def test_few_shot_scores_are_the_nearest_reference_patch_distance(monkeypatch):
    # a small block size makes the model take the bank a few images at a time
    monkeypatch.setattr(torch_model, "BLOCK_ELEMENTS", 3000)
    trainer = make_trainer("few_shot")
    references = StripesDataset(3, seed=1, size=32)
    trainer.fit(DataLoader(references, batch_size=2))
    model = trainer.model.eval()
    assert model.memory_bank.shape == (3, 16, 128 + 256)  # layer2 4x4 and layer3 upsampled to it
    tests = StripesDataset(4, anomalous_every=2, seed=2, size=32)
    images = torch.stack([item["image"] for item in tests])
    outputs = model(images)
    assert isinstance(outputs, InferenceBatch) and outputs["pred_score"] is outputs.pred_score
    with torch.no_grad():
        queries = model.embed(images)[0]
        bank = model.embed(torch.stack([item["image"] for item in references]))[0]
    expected = brute_force_scores(queries, bank)
    torch.testing.assert_close(outputs.pred_score.double(), expected.amax(1), rtol=1e-4, atol=1e-4)
    expected_map = F.interpolate(expected.reshape(4, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs.anomaly_map.double(), expected_map, rtol=1e-4, atol=1e-4)
    # a reference image itself is at distance 0 from the bank: the few-shot model does not skip it
    assert float(model(references[0]["image"][None]).pred_score) < 1e-2


def test_zero_shot_scores_each_test_image_against_the_other_test_images():
    trainer = make_trainer("zero_shot")
    trainer.fit(None)  # no training images at all
    tests = StripesDataset(5, anomalous_every=3, seed=3, size=32)
    loader = DataLoader(tests, batch_size=2)
    trainer.prepare(loader)
    predictions = trainer.predict(loader)
    model = trainer.model
    images = torch.stack([item["image"] for item in tests])
    with torch.no_grad():
        embedded = model.embed(images)[0]
    expected = torch.stack([brute_force_scores(embedded[index:index + 1], torch.cat((embedded[:index],
                                                                                   embedded[index + 1:])))[0]
                            for index in range(5)])
    torch.testing.assert_close(predictions["pred_score"].double(), expected.amax(1), rtol=1e-4, atol=1e-4)
    assert predictions["pred_score"].min() > 0.1  # no image matched its own copy in the bank
    # the anomalous images (0 and 3) stand out among the unlabeled set
    assert predictions["pred_score"][[0, 3]].min() > predictions["pred_score"][[1, 2, 4]].max()


def test_a_one_class_model_still_refuses_an_absent_training_set():
    trainer = BaseTrainer()
    trainer.model = torch.nn.Identity()
    with pytest.raises(TrainingError, match="training set is empty"):
        trainer.fit(None)
    with pytest.raises(ConfigError, match="few_shot, zero_shot"):
        PatchKnnTrainer(backbone="resnet18", learning_type="one_class")
