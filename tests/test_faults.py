# tests/test_faults.py
# fault injection through the CLI (src/run.py as a subprocess, tiny inputs): each case ends with the right result,
# or with exit code 1, one message and no traceback, leaving every file already written as it was. Each process
# costs seconds of imports, so cases share processes: one multirun holds several, each run its own case.
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[64,64]", "trainer.progress_bar=false",
         "backbone=resnet18", "backbone.pretrained=false", "evaluation.efficiency=false", "evaluation.save_images=false"]
SIZE = 48
LARGE = 64
DEFECTS = 3


def environment(workspace):
    env = dict(os.environ, DATASET_DIR=str(workspace / "datasets"), BACKBONE_DIR=str(workspace / "backbones"),
               OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(workspace, *overrides, multirun=False):
    mode = ["-m", f"paths.multirun_dir={workspace / 'multirun'}"] if multirun else []
    command = [sys.executable, str(ROOT / "src" / "run.py"), *mode, *SMALL, *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=environment(workspace), timeout=300)


def snapshot(folder):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_unchanged(before):
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in before} == before


def assert_one_message(result, message):
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count(message) == 1, output
    assert "Traceback" not in output, output


def write_camera_panels(root):
    # a mono camera's 16-bit frames (8-bit values * 257) with bright square defects; each defect also as a 16-bit
    # TIFF and an 8-bit PNG, the same picture, which must score the same; one defect is larger (LARGE pixels a side)
    rng = np.random.default_rng(0)
    for folder in ("good", "bad", "masks", "masks_small"):
        (root / folder).mkdir(parents=True)
    for index in range(15):
        frame = rng.normal(110, 6, (SIZE, SIZE)).clip(0, 255).astype(np.uint16) * 257
        Image.fromarray(frame).save(root / "good" / f"{index:03d}.png")
    for index in range(DEFECTS + 1):
        size = LARGE if index == DEFECTS else SIZE
        picture = rng.normal(110, 6, (size, size)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 16, 2)
        picture[y:y + 12, x:x + 12] = 240
        mask[y:y + 12, x:x + 12] = 255
        names = [f"z{index}"] if index == DEFECTS else [f"b{index}", f"b{index}_tif", f"b{index}_8bit"]
        for name in names:
            image = Image.fromarray(picture if name.endswith("8bit") else picture.astype(np.uint16) * 257)
            image.save(root / "bad" / (f"{name}.tif" if name.endswith("tif") else f"{name}.png"))
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            Image.fromarray(mask[::2, ::2]).save(root / "masks_small" / f"{name}.png")


def read_scores(run_dir):
    with open(run_dir / "test_scores.csv", newline="") as handle:
        return {Path(row["image_path"]).name: float(row["pred_score"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def camera_sweep(tmp_path_factory):
    # one process, four runs: the 48x48 frames and one 64x64 defect under a pixel limit that allows the large one
    # (5000) or not (3000), with masks of the images' size or of half their size
    workspace = tmp_path_factory.mktemp("faults")
    panels = workspace / "panels"
    write_camera_panels(panels)
    written = snapshot(workspace)
    result = run_cli(workspace, "dataset=folder", f"dataset.root={panels}", "dataset.abnormal_dir=bad",
                     "dataset.mask_dir=masks,masks_small", "dataset.max_image_pixels=3000,5000", "sweep.name=camera",
                     multirun=True)
    runs = {}
    for path in (workspace / "multirun" / "camera").glob("*/metrics.json"):
        record = json.loads(path.read_text())
        overrides = record["run"]["overrides"]
        key = ("masks_small" if "dataset.mask_dir=masks_small" in overrides else "masks",
               3000 if "dataset.max_image_pixels=3000" in overrides else 5000)
        runs[key] = (path.parent, record)
    assert_unchanged(written)
    return workspace, result, runs


def test_sixteen_bit_defects_score_as_their_eight_bit_versions(camera_sweep):
    _, result, runs = camera_sweep
    run_dir, record = runs[("masks", 5000)]
    assert record["status"] == "ok", result.stdout + result.stderr
    scores = read_scores(run_dir)
    for index in range(DEFECTS):
        eight = scores[f"b{index}_8bit.png"]
        assert abs(scores[f"b{index}.png"] - eight) <= 1e-5 * abs(eight)
        assert abs(scores[f"b{index}_tif.tif"] - eight) <= 1e-5 * abs(eight)
    # the 16-bit frames are not read as white: every defect, the large one included, scores above every normal frame
    normal = [score for name, score in scores.items() if not name.startswith(("b", "z"))]
    defective = [score for name, score in scores.items() if name.startswith(("b", "z"))]
    assert len(normal) == 3 and len(defective) == 3 * DEFECTS + 1
    assert min(defective) > max(normal)
    assert record["metrics"]["image_auroc"] == 1.0


def test_predict_reads_sixteen_bit_files_as_the_run_did(camera_sweep):
    from defectvad.inference.predictions import predict_files
    from defectvad.inference.runs import TrainedRun

    workspace, _, runs = camera_sweep
    run_dir, _ = runs[("masks", 5000)]
    expected = read_scores(run_dir)
    run = TrainedRun(run_dir, "cpu")
    paths = sorted((workspace / "panels" / "bad").iterdir())
    skipped = []
    predicted = {path.name: score for path, _, score, _ in predict_files(run, paths, 4, skipped)}
    assert not skipped and set(predicted) == {path.name for path in paths}
    for name, score in predicted.items():
        assert abs(score - expected[name]) <= 1e-5 * abs(expected[name])
    run.max_image_pixels = 3000
    skipped = []
    assert len(list(predict_files(run, paths, 4, skipped))) == len(paths) - 1
    assert [path.name for path, _ in skipped] == [f"z{DEFECTS}.png"]
    assert "raise dataset.max_image_pixels" in skipped[0][1]


def test_an_image_over_the_pixel_limit_stops_its_run_naming_the_setting(camera_sweep):
    _, result, runs = camera_sweep
    _, record = runs[("masks", 3000)]
    assert record["status"] == "failed"
    message = record["error"]
    assert message.startswith("image ") and f"bad/z{DEFECTS}.png is over the limit on pixels, 3000" in message
    assert f"({LARGE * LARGE} pixels)" in message and "raise dataset.max_image_pixels" in message
    assert_one_message(result, message)


def test_a_mask_of_another_size_stops_its_run_naming_both_sizes(camera_sweep):
    _, result, runs = camera_sweep
    messages = {runs[("masks_small", limit)][1]["error"] for limit in (3000, 5000)}
    assert len(messages) == 1
    message = messages.pop()
    assert "masks_small/b0.png is 24x24 pixels (width x height) but its image" in message
    assert "bad/b0.png is 48x48" in message and "dataset.resize_masks=true" in message
    # the sweep logs each failed run once (both runs fail with the same text) and exits 1
    output = result.stdout + result.stderr
    assert result.returncode == 1 and output.count(message) == 2 and "Traceback" not in output


def test_a_single_run_ends_with_one_message_and_leaves_written_files_alone(camera_sweep):
    workspace, _, _ = camera_sweep
    written = snapshot(workspace)
    result = run_cli(workspace, "dataset=folder", f"dataset.root={workspace / 'panels'}", "dataset.abnormal_dir=bad",
                     "dataset.mask_dir=masks_small", f"hydra.run.dir={workspace / 'single'}")
    assert_one_message(result, "error: mask ")
    assert "is 24x24 pixels (width x height) but its image" in result.stdout + result.stderr
    assert_unchanged(written)
    assert json.loads((workspace / "single" / "metrics.json").read_text())["status"] == "failed"
