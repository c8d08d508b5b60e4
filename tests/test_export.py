# tests/test_export.py
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

onnxruntime = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[64,64]", "trainer.progress_bar=false",
         "backbone=resnet18", "backbone.pretrained=false", "evaluation.save_images=false",
         "evaluation.efficiency=false"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_panels(root, normal=12, anomalous=3, size=48):
    rng = np.random.default_rng(0)
    for folder in ("good", "bad"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(normal):
        image = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "good" / f"{index}.png")
    for index in range(anomalous):
        image = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
        image[10:22, 10:22] = (250, 30, 30)
        Image.fromarray(image).save(root / "bad" / f"b{index}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # PaDiM and PatchCore trained in one multirun
    workspace = tmp_path_factory.mktemp("export")
    write_panels(workspace / "panels")
    env = dict(os.environ, DATASET_DIR=str(workspace / "datasets"), BACKBONE_DIR=str(workspace / "backbones"))
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(ROOT / "src" / "run.py"), "-m", "model=padim,patchcore", *SMALL, "dataset=folder",
               f"dataset.root={workspace / 'panels'}", "dataset.abnormal_dir=bad", "sweep.name=export",
               f"paths.multirun_dir={workspace / 'multirun'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = {}
    for metrics in (workspace / "multirun" / "export").glob("*/metrics.json"):
        found[json.loads(metrics.read_text())["run"]["model"]] = metrics.parent
    assert sorted(found) == ["padim", "patchcore"]
    return found


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_export_matches_pytorch_in_onnxruntime(runs, tmp_path, capsys, model):
    from defectvad.inference.runs import TrainedRun

    out = tmp_path / f"{model}.onnx"
    assert load_tool("export").main([str(runs[model]), "--format", "onnx", "--out", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    run = TrainedRun(runs[model], "cpu")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred_score", "anomaly_map"]
    for batch in (1, 4):  # the batch axis is dynamic
        images = run.example_inputs(batch, seed=7)
        scores, maps = session.run(None, {"image": images.numpy()})
        with torch.no_grad():
            expected = run.model(images)
        assert scores.shape == (batch,) and maps.shape == (batch, 1, 64, 64)
        scale = max(1.0, float(expected["anomaly_map"].abs().max()))
        assert np.abs(scores - expected["pred_score"].numpy()).max() <= 1e-4 * scale
        assert np.abs(maps - expected["anomaly_map"].numpy()).max() <= 1e-4 * scale
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["model"] == model and json.loads(metadata["input_shape"]) == [3, 64, 64]
    assert "f1_test" in json.loads(metadata["thresholds"])


class BatchLoopModel(nn.Module):
    # a Python loop over the batch: tracing keeps the batch size it saw
    def forward(self, images):
        maps = images.mean(1, keepdim=True)
        scores = torch.stack([maps[index].amax() for index in range(images.shape[0])])
        return {"pred_score": scores, "anomaly_map": maps}


def test_a_model_that_cannot_be_exported_says_why(runs, tmp_path, capsys, monkeypatch):
    from defectvad.inference.runs import TrainedRun

    trainer = type("Trainer", (), {"model": BatchLoopModel(), "normalize_input": True, "exportable": True})()
    monkeypatch.setattr(TrainedRun, "build_trainer", lambda self: trainer)
    out = tmp_path / "model.onnx"
    assert load_tool("export").main([str(runs["padim"]), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "cannot be exported to ONNX" in error and "instead of" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # neither the file nor a temporary one is left


def test_a_model_that_declares_itself_not_exportable_is_refused_before_tracing(runs, tmp_path, capsys, monkeypatch):
    from defectvad.inference.runs import TrainedRun

    trainer = type("Trainer", (), {"model": BatchLoopModel(), "normalize_input": True, "exportable": False})()
    monkeypatch.setattr(TrainedRun, "build_trainer", lambda self: trainer)
    out = tmp_path / "model.onnx"
    assert load_tool("export").main([str(runs["padim"]), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "cannot be exported to ONNX" in error and "exportable = False" in error and "Traceback" not in error
    assert not list(tmp_path.iterdir())
