# tests/test_experiment.py
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from defectvad.data.folder import FolderDataset
from defectvad.engine.checkpoints import load_weights
from defectvad.engine.run_record import keep_run_record
from defectvad.data.transforms import ImageTransform
from defectvad.engine.synthetic_validation import SyntheticAnomalySet
from defectvad.errors import ConfigError
from defectvad.experiment import run_experiment
from defectvad.inference.runs import TrainedRun
from defectvad.models.patch_knn.torch_model import PatchKnnModel
from fakes import StripesDataset, write_square_panels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def panels(tmp_path_factory):
    # grey noise; each anomalous panel has a square of its own colour and place, with its mask
    return write_square_panels(tmp_path_factory.mktemp("panels"), 16,
                               [(2, (250, 30, 30)), (12, (30, 250, 30)), (20, (30, 30, 250))])


def compose_run(panels, *overrides):
    small = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[32,32]", "trainer.progress_bar=false",
             "backbone=resnet18", "backbone.pretrained=false", "evaluation.save_images=false",
             "evaluation.efficiency=false", "dataset=folder", f"dataset.root={panels}", "dataset.abnormal_dir=bad",
             "dataset.mask_dir=masks", "dataset.normal_test_ratio=0.25"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*small, *overrides])


def run(panels, tmp_path, model, *overrides):
    cfg = compose_run(panels, f"model={model}", *overrides)
    return run_experiment(cfg, tmp_path, {"model": model, "dataset": "folder"}, list(overrides), ROOT)


@pytest.fixture
def built_splits(monkeypatch):
    splits = []
    original = FolderDataset.__init__

    def spy(self, *args, split=None, **kwargs):
        splits.append(split)
        original(self, *args, split=split, **kwargs)

    monkeypatch.setattr(FolderDataset, "__init__", spy)
    return splits


def test_zero_shot_run_builds_no_train_split(panels, tmp_path, built_splits):
    record = run(panels, tmp_path, "patch_knn_zeroshot", "dataset.k_shot=3")
    assert built_splits == ["test"]
    assert record["status"] == "ok" and json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    evaluation = record["evaluation"]
    assert (evaluation["learning_type"], evaluation["k_shot"], evaluation["train_images"]) == ("zero_shot", None, 0)
    assert evaluation["test_images"] == 4 + 3
    assert record["model"]["bank_images"] == 7
    assert record["metrics"]["image_auroc"] == 1.0
    assert record["validation"]["split"] is None
    # the bank that scored the test set is in the weights, so a later predict can rebuild it
    model = load_weights(PatchKnnModel(backbone="resnet18", exclude_self=True), tmp_path / "weights" / "last.safetensors")
    assert model.memory_bank.shape[0] == 7


def test_few_shot_run_takes_k_images_by_the_seed(panels, tmp_path, built_splits):
    record = run(panels, tmp_path / "default", "patch_knn_fewshot")
    assert (record["evaluation"]["k_shot"], record["evaluation"]["train_images"]) == (4, 4)  # the model's default
    record = run(panels, tmp_path / "k2", "patch_knn_fewshot", "dataset.k_shot=2", "evaluation.save_scores=false")
    assert (record["evaluation"]["learning_type"], record["evaluation"]["train_images"]) == ("few_shot", 2)
    assert record["model"]["bank_images"] == 2
    assert built_splits == ["train", "test", "train", "test"]
    assert (tmp_path / "default" / "test_scores.csv").is_file() and not (tmp_path / "k2" / "test_scores.csv").exists()


def test_one_class_model_records_k_and_holdout_comes_before_k(panels, tmp_path):
    record = run(panels, tmp_path, "padim", "dataset.k_shot=5", "evaluation.holdout=3")
    evaluation = record["evaluation"]
    assert (evaluation["learning_type"], evaluation["k_shot"]) == ("one_class", 5)
    assert (evaluation["train_images"], evaluation["holdout_images"]) == (5, 3)
    assert "normal" in record["thresholds"]


def test_early_stopping_on_held_out_images_reports_the_best_weights(panels, tmp_path):
    # the training loss falls, so "max" makes the first epoch the best and the last epoch differ from it
    record = run(panels, tmp_path, "autoencoder", "trainer.max_epochs=3", "trainer.validation=holdout",
                 "trainer.early_stopping.monitor=train_loss", "trainer.early_stopping.mode=max",
                 "trainer.early_stopping.patience=5", "evaluation.holdout=4", "model.depth=2", "model.max_width=16",
                 "loader.train_batch_size=4")
    validation = record["validation"]
    assert validation["split"] == "holdout (normal images + synthetic anomalies)"
    assert validation["monitor"] == "train_loss" and validation["weights"] == "best" and validation["epochs"] == 3
    assert validation["best"] > record["model"]["train_loss"]
    # the reported scores are those of the best epoch's weights, which predict also loads, not the last epoch's
    trained = TrainedRun(tmp_path, "cpu")
    assert trained.weights_path.name == "best.safetensors"
    with open(tmp_path / "test_scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    transform = ImageTransform([32, 32], None, trained.normalize)
    images = torch.stack([transform(Image.open(row["image_path"]))[0] for row in rows])
    reported = [float(row["pred_score"]) for row in rows]
    with torch.no_grad():
        np.testing.assert_allclose(trained.model(images).pred_score.numpy(), reported, rtol=1e-5, atol=1e-6)
        last = load_weights(trained.model, tmp_path / "weights" / "last.safetensors")(images).pred_score.numpy()
    assert np.abs(last - reported).max() > 1e-4


def test_holdout_validation_needs_held_out_images(panels, tmp_path):
    with pytest.raises(ConfigError, match="evaluation.holdout"):
        run(panels, tmp_path, "autoencoder", "trainer.validation=holdout", "trainer.early_stopping.monitor=image_auroc")
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "evaluation.holdout" in record["error"] and record["run"]["finished"]


def test_the_record_says_how_a_run_ended(tmp_path):
    for error, status in ((ValueError("bad value"), "failed"), (KeyboardInterrupt(), "interrupted")):
        path = tmp_path / f"{status}.json"
        with pytest.raises(type(error)):
            with keep_run_record(path, {"run": {}}) as record:
                assert json.loads(path.read_text())["status"] == "running"
                record["metrics"] = {"mad": 0.5}
                raise error
        written = json.loads(path.read_text())
        assert written["status"] == status and written["metrics"] == {"mad": 0.5}
        assert written["error"] == (str(error) or type(error).__name__) and type(error).__name__ in written["traceback"]
        assert written["run"]["started"] <= written["run"]["finished"]
    with keep_run_record(tmp_path / "ok.json", {"run": {}}):
        pass
    assert json.loads((tmp_path / "ok.json").read_text())["status"] == "ok"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["failed.json", "interrupted.json", "ok.json"]


def test_synthetic_anomalies_change_only_their_region_and_repeat_with_the_seed():
    normal = StripesDataset(3, size=32)
    validation = SyntheticAnomalySet(normal, seed=7)
    assert len(validation) == 6 and [validation[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(validation[1]["image"], normal[1]["image"]) and validation[1]["mask"].sum() == 0
    for index in range(3, 6):
        sample, source = validation[index], normal[index - 3]["image"]
        inside = sample["mask"][0] > 0
        assert inside.any() and torch.equal(sample["image"][:, ~inside], source[:, ~inside])
        assert not torch.equal(sample["image"][:, inside], source[:, inside])
        assert sample["image"].min() >= source.min() and sample["image"].max() <= source.max()
        assert torch.equal(SyntheticAnomalySet(normal, seed=7)[index]["image"], sample["image"])
    assert not torch.equal(SyntheticAnomalySet(normal, seed=8)[3]["mask"], validation[3]["mask"])
