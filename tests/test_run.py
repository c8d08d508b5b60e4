# tests/test_run.py
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad"}
SMALL = ["hardware=cpu", "transform.image_size=[64,64]", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    (root / "datasets").mkdir()
    (root / "backbones").mkdir()
    return root


def run_cli(workspace, *overrides, run_name="run"):
    env = dict(os.environ, DATASET_DIR=str(workspace / "datasets"), BACKBONE_DIR=str(workspace / "backbones"))
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = workspace / "runs" / run_name
    command = [sys.executable, str(ROOT / "src" / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return result, run_dir


def test_default_experiment_with_overrides_writes_a_complete_run_folder(workspace):
    result, run_dir = run_cli(workspace, *SMALL, "seed=3", "dataset.category=disc", run_name="ok")
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["run"]["model"] == "padim"
    assert record["run"]["backbone"] == "efficientnet_lite0"
    assert record["run"]["dataset"] == "synthetic"
    assert record["run"]["category"] == "disc"
    assert record["run"]["seed"] == 3
    assert record["run"]["image_size"] == [64, 64]
    assert "seed=3" in record["run"]["overrides"]
    assert set(record["metrics"]) == METRIC_KEYS
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())
    assert record["metrics"]["image_auroc"] > 0.8
    assert record["timing"]["fit_s"] > 0 and record["timing"]["test_s"] > 0
    assert record["environment"]["device"] == "cpu"
    assert record["evaluation"]["resolution"] == [64, 64]
    assert record["evaluation"]["aupro_fpr_limit"] == 0.3
    assert (run_dir / "weights" / "last.safetensors").is_file()
    assert "category: disc" in (run_dir / "config.yaml").read_text()
    assert "image_auroc" in result.stdout
    assert (run_dir / "run.log").read_text()
    assert not list(run_dir.glob(".*tmp*"))


def test_show_config():
    result = subprocess.run([sys.executable, str(ROOT / "src" / "run.py"), "--cfg", "job", "model=padim", "seed=5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout
    assert "_target_: defectvad.models.padim.trainer.PadimTrainer" in result.stdout


def assert_clean_failure(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in output, output
    assert "Traceback" not in output


def test_unknown_model_lists_valid_choices(workspace):
    result, _ = run_cli(workspace, "model=no_such_model")
    assert_clean_failure(result, "no_such_model", "padim")


def test_unknown_backbone_and_dataset_list_valid_choices(workspace):
    result, _ = run_cli(workspace, "backbone=resnet999")
    assert_clean_failure(result, "resnet999", "wide_resnet50_2")
    result, _ = run_cli(workspace, "dataset=imagenet")
    assert_clean_failure(result, "imagenet", "mvtec")


def test_missing_weights_stop_before_any_work(workspace):
    result, run_dir = run_cli(workspace, *SMALL, "backbone=resnet18", "dataset=mvtec", run_name="noweights")
    assert_clean_failure(result, "resnet18-f37072fd.pth", str(workspace / "backbones"), "download.pytorch.org")
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed"
    assert "resnet18-f37072fd.pth" in record["error"]
    # the data set was never touched: the MVTec folder does not exist and that was not reported
    assert "MVTec" not in result.stdout + result.stderr


def test_tampered_weights_file_is_refused(workspace, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "resnet18-f37072fd.pth").write_bytes(b"not the real weights")
    result, _ = run_cli(workspace, *SMALL, "backbone=resnet18", f"paths.backbone_dir={folder}", run_name="tampered")
    assert_clean_failure(result, "resnet18-f37072fd.pth", "does not match")


def test_missing_category_lists_what_was_found(workspace):
    mvtec = workspace / "datasets" / "MVTecAD"
    (mvtec / "bottle" / "train" / "good").mkdir(parents=True)
    result, run_dir = run_cli(workspace, *SMALL, "backbone.pretrained=false", "dataset=mvtec",
                              "dataset.category=cable", run_name="nocategory")
    assert_clean_failure(result, "cable", "bottle")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


def test_layer_the_backbone_lacks_lists_its_layers(workspace):
    result, _ = run_cli(workspace, *SMALL, "model.layers=[layer1,layer9]", run_name="badlayer")
    assert_clean_failure(result, "layer9", "layer4")


def write_folder_dataset(root, corrupt=False, drop_mask=False):
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(6):
        Image.new("RGB", (40, 40), (100 + index, 90, 80)).save(root / "good" / f"{index}.png")
    for index in range(2):
        Image.new("RGB", (40, 40), (250, 10, 10)).save(root / "bad" / f"b{index}.png")
        if not (drop_mask and index == 1):
            Image.new("L", (40, 40), 255).save(root / "masks" / f"b{index}.png")
    if corrupt:
        (root / "bad" / "b1.png").write_bytes((root / "bad" / "b1.png").read_bytes()[:60])


@pytest.mark.parametrize("problem, fragment", [("corrupt", "b1.png"), ("drop_mask", "b1")])
def test_bad_folder_data_names_the_file(workspace, tmp_path, problem, fragment):
    write_folder_dataset(tmp_path / "panels", corrupt=problem == "corrupt", drop_mask=problem == "drop_mask")
    result, _ = run_cli(workspace, *SMALL, "backbone.pretrained=false", "dataset=folder",
                        f"dataset.root={tmp_path / 'panels'}", "dataset.abnormal_dir=bad", "dataset.mask_dir=masks",
                        run_name=problem)
    assert_clean_failure(result, fragment)


def test_empty_training_set(workspace, tmp_path):
    (tmp_path / "panels" / "good").mkdir(parents=True)
    result, _ = run_cli(workspace, *SMALL, "backbone.pretrained=false", "dataset=folder",
                        f"dataset.root={tmp_path / 'panels'}", run_name="empty")
    assert_clean_failure(result, "no normal images")
