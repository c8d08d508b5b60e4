# tests/test_sweep.py
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from defectvad.data.btad import BTADDataset
from defectvad.data.mvtec import MVTecDataset
from defectvad.data.synthetic_generator import SYNTHETIC_CATEGORIES
from defectvad.data.visa import VisaDataset
from defectvad.sweeps.folders import find_sweep_name, run_folder_name, run_key, sweep_command

ROOT = Path(__file__).resolve().parents[1]

# one thread: on a busy machine, idle torch threads spin and slow everything down
SMALL = ["hardware=cpu", "hardware.threads=1", "transform.image_size=[64,64]", "trainer.progress_bar=false",
         "backbone.pretrained=false"]
# two models (PaDiM on two backbones) x two categories
SWEEP = [*SMALL, "backbone=efficientnet_lite0,resnet18", "dataset.category=tiles,disc"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    for name in ("datasets", "backbones", "multirun"):
        (root / name).mkdir()
    return root


def command(workspace, *overrides):
    return [sys.executable, str(ROOT / "src" / "run.py"), "-m", *overrides, f"paths.multirun_dir={workspace / 'multirun'}"]


def environment(workspace):
    env = dict(os.environ, DATASET_DIR=str(workspace / "datasets"), BACKBONE_DIR=str(workspace / "backbones"))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_sweep(workspace, *overrides):
    result = subprocess.run(command(workspace, *overrides), capture_output=True, text=True,
                            env=environment(workspace), timeout=300)
    return result, result.stdout + result.stderr


def read_statuses(folder):
    statuses = {}
    for path in folder.rglob("metrics.json"):
        try:
            statuses[path.parent.name] = json.loads(path.read_text())["status"]
        except (OSError, ValueError):
            pass
    return statuses


@pytest.fixture(scope="module")
def resumed_sweep(workspace):
    # start the sweep, stop it with SIGTERM while its second run works, start the same command again
    process = subprocess.Popen(command(workspace, *SWEEP), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment(workspace))
    deadline = time.time() + 240
    while True:
        statuses = list(read_statuses(workspace / "multirun").values())
        if "ok" in statuses and "running" in statuses:
            break
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    killed_output = process.communicate(timeout=120)[0]
    killed = {"returncode": process.returncode, "output": killed_output, "statuses": read_statuses(workspace / "multirun")}
    result, output = run_sweep(workspace, *SWEEP)
    return killed, result, output


def test_killed_sweep_records_the_interrupted_run_and_resumes_with_the_missing_runs(workspace, resumed_sweep):
    killed, result, output = resumed_sweep
    assert killed["returncode"] == 143, killed["output"]
    assert "stopped by SIGTERM" in killed["output"] and "Traceback" not in killed["output"]
    done = [name for name, status in killed["statuses"].items() if status == "ok"]
    assert 1 <= len(done) < 4
    assert sorted(set(killed["statuses"].values())) == ["interrupted", "ok"]

    assert result.returncode == 0, output
    sweeps = [path for path in (workspace / "multirun").iterdir()]
    assert len(sweeps) == 1, "the same command resumes the same sweep folder"
    assert f"resuming sweep {sweeps[0]}" in output
    assert all(f"skipped {name}" in output for name in done)
    assert f"{4 - len(done)} ok, {len(done)} skipped, 0 failed" in output
    statuses = read_statuses(sweeps[0])
    assert list(statuses.values()) == ["ok"] * 4
    assert "padim-resnet18-synthetic-disc-seed0-backbone.pretrained=False-hardware" in " ".join(statuses)


def test_sweep_writes_tables_with_one_row_per_category_and_a_mean(workspace, resumed_sweep):
    sweep = next((workspace / "multirun").iterdir())
    markdown = (sweep / "results.md").read_text()
    table = markdown.split("## synthetic\n\n")[1].splitlines()
    assert table[0].startswith("| category | padim · efficientnet_lite0<br>I-AUROC |")
    assert "padim · resnet18<br>mAD |" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["tiles", "disc", "mean"]
    assert "## Failed runs" not in markdown and "## Missing runs" not in markdown
    for name in ("results_long.csv", "results_summary.csv", "results_synthetic.csv"):
        assert (sweep / name).is_file()
    long = (sweep / "results_long.csv").read_text().splitlines()
    assert len(long) == 5 and all(",ok," in line for line in long[1:])
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 4 and len(json.loads((sweep / "sweep.json").read_text())["invocations"]) == 2


def test_same_command_again_skips_every_run(workspace, resumed_sweep):
    sweep = next((workspace / "multirun").iterdir())
    written = {path: path.stat().st_mtime_ns for path in sweep.rglob("metrics.json")}
    result, output = run_sweep(workspace, *SWEEP)
    assert result.returncode == 0, output
    assert output.count("skipped padim-") == 4
    assert "0 ok, 4 skipped, 0 failed" in output
    assert {path: path.stat().st_mtime_ns for path in sweep.rglob("metrics.json")} == written


def test_failed_run_is_recorded_and_the_parallel_sweep_goes_on(workspace, resumed_sweep):
    sweep = next((workspace / "multirun").iterdir())
    result, output = run_sweep(workspace, *SMALL, "hydra/launcher=joblib", "dataset.category=tiles,nosuch",
                               f"sweep.name={sweep.name}")
    assert result.returncode == 1, output
    assert "0 ok, 1 skipped, 1 failed" in output
    assert "validated against ConfigStore schema" not in output
    record = json.loads(next(sweep.glob("padim-efficientnet_lite0-synthetic-nosuch-*/metrics.json")).read_text())
    assert record["status"] == "failed"
    assert "unknown synthetic category 'nosuch'" in record["error"]
    assert "Traceback" in record["traceback"]
    markdown = (sweep / "results.md").read_text()
    assert "## Failed runs (1)" in markdown.split("## Summary")[0]
    assert "padim · efficientnet_lite0 · synthetic/nosuch · seed 0 | failed | unknown synthetic category" in markdown


def test_submitit_local_launcher_runs_a_job(workspace):
    result, output = run_sweep(workspace, *SMALL, "hydra/launcher=submitit_local", "dataset.category=tiles",
                               "sweep.name=submitit")
    assert result.returncode == 0, output
    sweep = workspace / "multirun" / "submitit"
    assert list(read_statuses(sweep).values()) == ["ok"]
    assert list((sweep / ".submitit").glob("*/*_log.out"))
    assert "1 ok, 0 skipped, 0 failed" in output


@pytest.mark.parametrize("preset, dataset, categories", [
    ("mvtec", "mvtec", MVTecDataset.CATEGORIES), ("visa", "visa", VisaDataset.CATEGORIES),
    ("btad", "btad", BTADDataset.CATEGORIES), ("synthetic", "synthetic", SYNTHETIC_CATEGORIES)])
def test_presets_sweep_every_category_in_official_order(preset, dataset, categories):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["dataset"] == dataset
    assert str(cfg.hydra.sweeper.params["dataset.category"]).split(",") == list(categories)
    assert cfg.sweep.rerun is False and cfg.sweep.name is None


def test_launcher_configs_name_the_plugins():
    launchers = {path.stem: yaml.safe_load(path.read_text()) for path in (ROOT / "conf/hydra/launcher").glob("*.yaml")}
    assert launchers["joblib"]["_target_"].endswith("JoblibLauncher")
    assert launchers["submitit_local"]["_target_"].endswith("LocalLauncher")
    assert launchers["submitit_slurm"]["_target_"].endswith("SlurmLauncher")


def test_run_folders_are_readable_distinct_and_safe():
    choices = {"model": "padim", "backbone": "resnet18", "dataset": "mvtec"}
    base = ["model=padim", "dataset.category=bottle", "sweep.rerun=true", "paths.multirun_dir=/x"]
    assert run_folder_name(choices, base, "bottle", 0) == "padim-resnet18-mvtec-bottle-seed0"
    assert run_folder_name(choices, [*base, "model.n_features=50"], "bottle", 1) == \
        "padim-resnet18-mvtec-bottle-seed1-model.n_features=50"
    unsafe = run_folder_name(choices, ["dataset.root=/data/a b:c"], "bottle", 0)
    assert "/" not in unsafe and ":" not in unsafe and unsafe.startswith("padim-resnet18-mvtec-bottle-seed0-dataset.root=")
    assert unsafe != run_folder_name(choices, ["dataset.root=/data/a_b_c"], "bottle", 0)
    long = run_folder_name(choices, [f"x{index}=1" for index in range(60)], "bottle", 0)
    assert len(long) < 200 and long != run_folder_name(choices, [f"x{index}=1" for index in range(61)], "bottle", 0)
    assert run_key(["sweep=mvtec", "seed=1", "sweep.name=a", "hardware=cpu"]) == ("hardware=cpu", "seed=1")
    assert sweep_command(["sweep=mvtec", "seed=1", "sweep.rerun=true"]) == ["seed=1", "sweep=mvtec"]


def test_sweep_name_resumes_the_same_command_only(tmp_path):
    assert find_sweep_name("paper", True, tmp_path, ["seed=1"]) == "paper"
    fresh = find_sweep_name(None, True, tmp_path, ["seed=1"])
    assert len(fresh) == len("2024-05-01_10-00-00_123456") and fresh[:2] == "20"
    (tmp_path / fresh).mkdir()
    (tmp_path / fresh / "sweep.json").write_text(json.dumps({"command": sweep_command(["seed=1"])}))
    assert find_sweep_name(None, True, tmp_path, ["sweep.rerun=true", "seed=1"]) == fresh
    assert find_sweep_name(None, True, tmp_path, ["seed=2"]) != fresh
    assert find_sweep_name(None, False, tmp_path, ["seed=1"]) != fresh
