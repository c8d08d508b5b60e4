# tests/test_predict.py
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectvad.errors import ConfigError
from defectvad.metrics.thresholds import select_threshold

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[64,64]", "trainer.progress_bar=false",
         "backbone=resnet18", "backbone.pretrained=false", "evaluation.efficiency_batch_size=4"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_panels(root, normal=16, anomalous=4, size=48):
    # noisy grey panels; anomalous ones carry a red square, with its mask
    rng = np.random.default_rng(0)
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(normal):
        image = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "good" / f"{index:03d}.png")
    for index in range(anomalous):
        image = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 16, 2)
        image[y:y + 12, x:x + 12] = (250, 30, 30)
        mask[y:y + 12, x:x + 12] = 255
        Image.fromarray(image).save(root / "bad" / f"b{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{index}.png")


def train_run(workspace, run_dir, *overrides):
    env = dict(os.environ, DATASET_DIR=str(workspace / "datasets"), BACKBONE_DIR=str(workspace / "backbones"))
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(ROOT / "src" / "run.py"), *SMALL, "dataset=folder",
               f"dataset.root={workspace / 'panels'}", "dataset.abnormal_dir=bad", "dataset.mask_dir=masks",
               *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("predict")
    write_panels(workspace / "panels")
    run_dir = train_run(workspace, workspace / "run", "evaluation.holdout=4", "seed=1")
    return workspace, run_dir


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_stores_thresholds_scores_efficiency_and_pictures(trained):
    _, run_dir = trained
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["evaluation"]["train_images"] == 16 - 3 - 4  # 20% of the normals are test images (folder data)
    assert record["evaluation"]["holdout_images"] == 4
    thresholds = record["thresholds"]
    assert thresholds["normal"]["images"] == 4 and thresholds["normal"]["quantile"] == 0.99
    assert "test set" in thresholds["f1_test"]["note"]
    scores = read_csv(run_dir / "test_scores.csv")
    assert len(scores) == record["evaluation"]["test_images"] == 7
    normal_scores = [float(row["pred_score"]) for row in scores if row["label"] == "0"]
    anomalous_scores = [float(row["pred_score"]) for row in scores if row["label"] == "1"]
    assert thresholds["f1_test"]["image"] == min(anomalous_scores) > max(normal_scores)
    efficiency = record["efficiency"]
    assert efficiency["measured"] and efficiency["parameters"]["trainable"] == 0
    assert efficiency["parameters"]["total"] > 1e6 and efficiency["flops_per_image"] > 1e7
    assert efficiency["latency_ms"] > 0 and efficiency["throughput_images_per_s"] > 0
    assert efficiency["latency"]["warmup"] == 2 and efficiency["latency"]["repeats"] == 5
    assert efficiency["throughput"]["batch_size"] == 4 and efficiency["peak_rss_mb"] > 0
    assert efficiency["fit_s"] == record["timing"]["fit_s"]
    # three per defect type in test-set order, no errors to show (the red squares are easy), two plots
    examples = [f"bad_b{index}.png" for index in range(3)]
    examples += [f"good_{Path(row['image_path']).stem}.png" for row in scores if row["label"] == "0"][:3]
    pictures = sorted(p.name for p in (run_dir / "images").iterdir())
    assert pictures == sorted(examples + ["roc_curve.png", "score_histogram.png"])


def test_prediction_reproduces_the_run_scores_and_labels(trained, tmp_path, capsys):
    workspace, run_dir = trained
    predict = load_tool("predict")
    assert predict.main([str(run_dir), str(workspace / "panels"), "--out", str(tmp_path), "--threshold", "f1"]) == 0
    rows = {row["path"]: row for row in read_csv(tmp_path / "predictions.csv")}
    expected = read_csv(run_dir / "test_scores.csv")
    for row in expected:
        found = rows[row["image_path"]]
        assert abs(float(found["score"]) - float(row["pred_score"])) < 1e-5
        assert found["label"] == row["predicted_f1_test"] and found["threshold_kind"] == "f1_test"
    assert len(rows) == 16 + 4 + 4  # the masks folder is predicted too: every image below the folder
    assert (tmp_path / "good_000.png").is_file() and (tmp_path / "bad_b1.png").is_file()
    with Image.open(tmp_path / "bad_b1.png") as picture:
        assert picture.width == 3 * 256 and picture.height > 256
    assert "24 images predicted" in capsys.readouterr().out


def test_mixed_sizes_and_formats_and_a_corrupt_file(trained, tmp_path, capsys):
    _, run_dir = trained
    folder = tmp_path / "line"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 50, 3), dtype=np.uint8)).save(folder / "sub" / "c.bmp")
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8)).save(folder / "sub" / "d.png")  # greyscale
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "broken.png")
    (folder / "broken.png").write_bytes((folder / "broken.png").read_bytes()[:80])
    (folder / "notes.txt").write_text("not an image")
    predict = load_tool("predict")
    assert predict.main([str(run_dir), str(folder), "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr()
    assert "broken.png" in output.err and "warning" in output.err
    assert "4 images predicted" in output.out and "1 skipped" in output.out
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(Path(row["path"]).name for row in rows) == ["a.png", "b.jpg", "c.bmp", "d.png"]
    assert {row["threshold_kind"] for row in rows} == {"normal"}  # the default when the run has one
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png", "sub_c.png", "sub_d.png"]


@pytest.mark.parametrize("choice, kind", [("f1", "f1_test"), ("normal", "normal"), ("1e9", "value"), ("-1e9", "value")])
def test_threshold_choices(trained, tmp_path, choice, kind):
    workspace, run_dir = trained
    thresholds = json.loads((run_dir / "metrics.json").read_text())["thresholds"]
    expected = {"f1": thresholds["f1_test"]["image"], "normal": thresholds["normal"]["image"]}.get(choice)
    expected = float(choice) if expected is None else expected
    predict = load_tool("predict")
    images = str(workspace / "panels" / "bad" / "b*.png")
    assert predict.main([str(run_dir), images, "--out", str(tmp_path), f"--threshold={choice}", "--no-pictures"]) == 0
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 4 and not list(tmp_path.glob("*.png"))
    for row in rows:
        assert row["threshold_kind"] == kind and float(row["threshold"]) == expected
        assert row["label"] == str(int(float(row["score"]) >= expected))
    if choice == "1e9":
        assert {row["label"] for row in rows} == {"0"}
    if choice == "-1e9":
        assert {row["label"] for row in rows} == {"1"}


def test_select_threshold_refuses_what_the_run_lacks():
    thresholds = {"f1_test": {"image": float("nan"), "pixel": float("nan")}, "normal": None, "map_range": [0, 1]}
    with pytest.raises(ConfigError, match="holdout"):
        select_threshold(thresholds, "normal")
    with pytest.raises(ConfigError, match="no F1 threshold"):
        select_threshold(thresholds, None)
    with pytest.raises(ConfigError, match="choose f1, normal or a number"):
        select_threshold(thresholds, "median")
    thresholds["f1_test"] = {"image": 2.0, "pixel": float("nan")}
    assert select_threshold(thresholds, None) == (2.0, 2.0, "f1_test")


@pytest.mark.parametrize("damage, fragment", [
    ("weights", "no weights/best.safetensors or weights/last.safetensors"),
    ("config", "no config.yaml"),
    ("status", "status 'failed'"),
    ("metrics", "no metrics.json"),
])
def test_an_incomplete_run_folder_is_refused(trained, tmp_path, capsys, damage, fragment):
    workspace, run_dir = trained
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    if damage == "weights":
        shutil.rmtree(broken / "weights")
    elif damage == "config":
        (broken / "config.yaml").unlink()
    elif damage == "metrics":
        (broken / "metrics.json").unlink()
    else:
        record = json.loads((broken / "metrics.json").read_text())
        (broken / "metrics.json").write_text(json.dumps(dict(record, status="failed")))
    predict = load_tool("predict")
    assert predict.main([str(broken), str(workspace / "panels" / "bad"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert fragment in error and "not a complete run folder" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
