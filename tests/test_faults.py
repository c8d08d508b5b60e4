# tests/test_faults.py
# fault injection through the CLI (src/run.py as a subprocess, tiny inputs): each case ends with the right result,
# or with exit code 1, one message and no traceback, leaving every file already written as it was. Each process
# costs seconds of imports, so cases share processes: one multirun holds several, each run its own case.
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
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


# settings, training, run folders and disks: padim or stfpm on a few 32x32 panels
PANELS = ["dataset=folder", "dataset.abnormal_dir=bad", "dataset.mask_dir=masks", "transform.image_size=[32,32]"]
# +fault=<name>: one wrong setting each, in a config group the test writes, so that one multirun holds them all
# (name -> yaml, message); the command line sets neither threads nor image size, which a group cannot override
FAULT_BASE = {"hardware": {"threads": 1}, "transform": {"image_size": [32, 32]}}
FAULT_CLI = [option for option in SMALL + PANELS if option.split("=")[0] not in ("hardware.threads",
                                                                                   "transform.image_size")]
FAULTS = {
    "seed_text": ("seed: abc", "seed=abc is not allowed: seed must be an integer from 0 to 4294967295"),
    "seed_fraction": ("seed: 1.5", "seed=1.5 is not allowed: seed must be an integer from 0 to 4294967295"),
    "seed_large": ("seed: 4294967296", "seed=4294967296 is not allowed"),
    "no_epochs": ("trainer: {max_epochs: 0}", "trainer.max_epochs=0 is not allowed: trainer.max_epochs must be an "
                  "integer >= 1, or null for the model's default (trainer.max_steps can end training earlier)"),
    "no_steps": ("trainer: {max_steps: 0}", "trainer.max_steps=0 is not allowed: trainer.max_steps must be an "
                 "integer >= 1, or null for no limit on steps"),
    "train_batch": ("loader: {train_batch_size: 0}", "loader.train_batch_size=0 is not allowed: "
                    "loader.train_batch_size must be an integer >= 1"),
    "threads": ("hardware: {threads: -3}", "hardware.threads=-3 is not allowed: hardware.threads must be an "
                "integer >= 1, or null for torch's default"),
    "workers": ("hardware: {num_workers: -1}", "hardware.num_workers=-1 is not allowed: hardware.num_workers must "
                "be an integer >= 0"),
    "image_size": ("transform: {image_size: [0, 32]}", "transform.image_size=[0,32] is not allowed: "
                   "transform.image_size must be a pair [height,width] of integers >= 1"),
    "coreset": ("defaults:\n  - override /model: patchcore\nmodel: {coreset_sampling_ratio: 0}",
                "model.coreset_sampling_ratio must be a number in (0, 1], got 0"),
    # a learning rate that sends STFPM's weights to ~1e30: epoch 1 ends finite, the loss is NaN in epoch 2
    "exploding": ("defaults:\n  - override /model: stfpm\nmodel: {lr: 1.0e+30}\ntrainer: {max_epochs: 3}",
                  "the loss became nan at epoch 2, step 2; training stopped; "),
}


def write_panels(root):
    rng = np.random.default_rng(1)
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(8):
        image = rng.normal(120, 8, (32, 32, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "good" / f"{index}.png")
    for index in range(2):
        image = rng.normal(120, 8, (32, 32, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        image[4:12, 4:12], mask[4:12, 4:12] = 250, 255
        Image.fromarray(image).save(root / "bad" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def panels_workspace(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("settings")
    panels = write_panels(workspace / "panels")
    for name, (text, _) in FAULTS.items():
        path = workspace / "conf" / "fault" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = OmegaConf.merge(FAULT_BASE, OmegaConf.create(text))
        path.write_text(f"# @package _global_\n{OmegaConf.to_yaml(settings)}")
    return workspace, [*PANELS, f"dataset.root={panels}"]


def test_each_wrong_setting_stops_its_run_with_one_message(panels_workspace):
    workspace, panels = panels_workspace
    written = snapshot(workspace)
    command = [sys.executable, str(ROOT / "src" / "run.py"), "-m", f"paths.multirun_dir={workspace / 'multirun'}",
               *FAULT_CLI, panels[-1], f"hydra.searchpath=[file://{workspace / 'conf'}]", "sweep.name=faults",
               f"+fault={','.join(FAULTS)}"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(workspace), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert_unchanged(written)
    records = {}
    for path in (workspace / "multirun" / "faults").glob("*/metrics.json"):
        record = json.loads(path.read_text())
        fault = next(o for o in record["run"]["overrides"] if o.startswith("+fault=")).split("=")[1]
        records[fault] = (path.parent, record)
    assert sorted(records) == sorted(FAULTS)
    for fault, (_, message) in FAULTS.items():
        record = records[fault][1]
        assert record["status"] == "failed" and message in record["error"], (fault, record["error"])
        # the sweep logs each failed run once, with its message
        assert output.count(record["error"]) == 1, (fault, output)
    # the exploding run kept epoch 1, whose weights are finite, and says so
    run_dir = records["exploding"][0]
    weights = run_dir / "weights" / "last.safetensors"
    assert f"{weights} holds the finite weights of epoch 1" in records["exploding"][1]["error"]
    from safetensors.torch import load_file

    assert all(bool(value.isfinite().all()) for value in load_file(weights).values())
    assert sorted(path.name for path in weights.parent.iterdir()) == ["last.safetensors"]


def test_a_misspelt_key_lists_the_keys_of_its_group(panels_workspace):
    workspace, panels = panels_workspace
    result = run_cli(workspace, *panels, "trainer.max_epoch=2", f"hydra.run.dir={workspace / 'misspelt'}")
    assert_one_message(result, "error: unknown config key trainer.max_epoch (did you mean trainer.max_epochs?); "
                               "the keys of trainer are: max_epochs, max_steps, gradient_clip_val, "
                               "check_val_every_n_epoch, progress_bar, validation, early_stopping; to add a key that "
                               "is not in the config, write +trainer.max_epoch=2")
    assert not (workspace / "misspelt").exists()


def test_an_output_folder_under_a_file_names_the_file(panels_workspace):
    # tests run as root, where a read-only mode does not stop writes: a file where a folder must go does
    workspace, panels = panels_workspace
    blocking = workspace / "not_a_folder"
    blocking.write_text("keep me")
    single = run_cli(workspace, *panels, f"paths.output_dir={blocking / 'runs'}")
    assert_one_message(single, "is a file, not a folder; choose another folder (paths.output_dir, "
                               "paths.multirun_dir or hydra.run.dir)")
    assert f"error: cannot write {blocking / 'runs'}/padim/folder_custom/" in single.stderr
    sweep = run_cli(workspace, *panels, f"paths.multirun_dir={blocking / 'sweeps'}", "seed=1,2", multirun=True)
    assert_one_message(sweep, f"error: cannot write {blocking / 'sweeps'}/")
    assert f": {blocking} is a file, not a folder" in sweep.stderr
    assert blocking.read_text() == "keep me"


def read_lock_pid(run_dir):
    try:
        return json.loads((run_dir / "run.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_one_folder_one_run_and_an_ok_run_is_kept(panels_workspace):
    workspace, panels = panels_workspace
    run_dir = workspace / "shared"
    # a lock left by a process that has ended (killed outright): the first run takes it over
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname()}))
    command = [sys.executable, str(ROOT / "src" / "run.py"), *SMALL, *panels, f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=environment(workspace))
    try:
        for _ in range(600):
            if read_lock_pid(run_dir) == first.pid or first.poll() is not None:
                break
            time.sleep(0.1)
        # the second run on the folder stops at once, naming the first
        second = subprocess.run(command, capture_output=True, text=True, env=environment(workspace), timeout=300)
        assert first.poll() is None, "the first run ended before the second started"
        holder = json.loads((run_dir / "run.lock").read_text())
        assert_one_message(second, f"error: the run folder {run_dir} is in use by process {first.pid} on "
                                   f"{holder['host']} (started {holder['started']}; lock file {run_dir / 'run.lock'})")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stdout + stderr
    assert f"taking over {run_dir / 'run.lock'}: process {int(ended.stdout)} on {socket.gethostname()} has ended" in (
        stdout + stderr)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["image_auroc"] >= 0
    assert "in use" not in (run_dir / "run.log").read_text() and not (run_dir / "run.lock").exists()
    # reused without overwrite: stops, and writes nothing
    written = snapshot(run_dir)
    again = run_cli(workspace, *panels, f"hydra.run.dir={run_dir}")
    assert_one_message(again, f"error: the run folder {run_dir} already holds an ok run (finished "
                              f"{record['run']['finished']}); overwrite=true runs again")
    assert snapshot(run_dir) == written
    # overwrite=true with a run that fails: the ok run's files move whole to previous-<time>/, none stays beside
    replaced = run_cli(workspace, *panels, "seed=abc", "overwrite=true", f"hydra.run.dir={run_dir}")
    assert_one_message(replaced, "error: seed=abc is not allowed: seed must be an integer from 0 to 4294967295")
    previous = [path for path in run_dir.iterdir() if path.name.startswith("previous-")]
    assert len(previous) == 1
    assert snapshot(previous[0]) == {previous[0] / path.relative_to(run_dir): digest
                                     for path, digest in written.items()}
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(["config.yaml", "metrics.json", "run.log",
                                                                      previous[0].name])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


@pytest.fixture
def small_disk(tmp_path):
    # a real full disk: a 1 MiB tmpfs (the suite runs as root; elsewhere the mount is refused and the test skips)
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_full_disk_ends_with_one_message_naming_the_file(panels_workspace, small_disk):
    # PaDiM's Gaussian (64 positions x 100 x 100 floats) does not fit beside the run's other files
    workspace, panels = panels_workspace
    run_dir = small_disk / "run"
    result = run_cli(workspace, *panels, f"hydra.run.dir={run_dir}")
    assert_one_message(result, "no space left on the device; free some space or choose a folder on another disk")
    assert f"error: cannot write {run_dir / 'weights'}" in result.stdout + result.stderr
    # no temporary file is left behind; what was written is whole
    names = sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*") if path.is_file())
    assert not any(name.split("/")[-1].startswith(".") for name in names), names
    assert json.loads((run_dir / "metrics.json").read_text())["status"] in ("running", "failed")
