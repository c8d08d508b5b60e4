# tests/test_kshot_tables.py
import importlib.util
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from defectvad.sweeps.folders import register_resolvers, run_folder_name
from defectvad.sweeps.tables import shot_labels

ROOT = Path(__file__).resolve().parents[1]
# image AUROC per (model, k, category) and seed; every metric of a run equals it
RUNS = {
    ("padim", 1, "bottle"): (0.70, 0.80, 0.90),
    ("padim", 1, "cable"): (0.60, 0.60, 0.60),
    ("padim", 2, "bottle"): (0.84, 0.86, 0.88),
    ("padim", 2, "cable"): (0.90, 0.82),
    ("winclip", 0, "bottle"): (0.75, 0.75, 0.75),
    ("winclip", 0, "cable"): (0.65, 0.65),
    ("winclip", 1, "bottle"): (0.95, 0.95, 0.95),
    ("winclip", 1, "cable"): (0.55, 0.55, 0.55),
}


def load_tool():
    spec = importlib.util.spec_from_file_location("aggregate", ROOT / "tools" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder, model, k_shot, category, seed, auroc=None, error=None):
    overrides = [f"model={model}", f"dataset.category={category}", f"dataset.k_shot={k_shot}", f"seed={seed}"]
    record = {"status": "ok" if error is None else "failed",
              "run": {"model": model, "backbone": "resnet18", "dataset": "mvtec", "category": category, "seed": seed,
                      "image_size": [256, 256], "overrides": overrides, "finished": "2024-05-01T10:00:00+00:00"}}
    if error is None:
        # as the run records it: a zero-shot model took no training images (k_shot null)
        zero_shot = model == "winclip" and k_shot == 0
        record.update(metrics={key: auroc for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc",
                                                      "pixel_ap", "pixel_f1max", "aupro", "mad")},
                      evaluation={"learning_type": "zero_shot" if zero_shot else "few_shot",
                                  "k_shot": None if zero_shot else k_shot})
    else:
        # failed before its evaluation: k comes from the command
        record.update(error=error)
    run_dir = folder / f"{model}-resnet18-mvtec-{category}-k{k_shot}-seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fewshot")
    for (model, k_shot, category), values in RUNS.items():
        for seed, auroc in enumerate(values):
            write_run(folder, model, k_shot, category, seed, auroc)
    write_run(folder, "padim", 2, "cable", 2, error="out of memory")
    assert load_tool().main([str(folder), "--metrics", "image_auroc"]) == 0
    return folder


def table_rows(markdown, title):
    section = markdown.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()]


def seed_spread(*values):
    return f"{statistics.stdev(values) * 100:.1f}"


def test_dataset_table_has_a_column_group_per_k_with_mean_and_std_over_seeds(report):
    rows = table_rows((report / "results.md").read_text(), "mvtec")
    assert rows[0] == ["category", "k=0<br>winclip<br>I-AUROC", "k=1<br>padim<br>I-AUROC",
                       "k=1<br>winclip<br>I-AUROC", "k=2<br>padim<br>I-AUROC"]
    # the best is chosen within each k: alone in its group, nothing is bold
    assert rows[2] == ["bottle", "75.0 ± 0.0", f"80.0 ± {seed_spread(0.7, 0.8, 0.9)}", "**95.0 ± 0.0**",
                       f"86.0 ± {seed_spread(0.84, 0.86, 0.88)}"]
    assert rows[3] == ["cable", "65.0 ± 0.0", "**60.0 ± 0.0**", "55.0 ± 0.0", f"86.0 ± {seed_spread(0.90, 0.82)}"]
    # mean row: std over the seeds' category means; a seed missing a category averages the others
    assert rows[4] == ["mean", f"70.0 ± {seed_spread(0.70, 0.70, 0.75)}", f"70.0 ± {seed_spread(0.65, 0.70, 0.75)}",
                       "**75.0 ± 0.0**", f"86.0 ± {seed_spread(0.87, 0.84, 0.88)}"]
    assert (seed_spread(0.65, 0.70, 0.75), seed_spread(0.87, 0.84, 0.88)) == ("5.0", "2.1")


def test_summary_has_a_row_group_per_k(report):
    rows = table_rows((report / "results.md").read_text(), "Summary")
    assert rows[0][:4] == ["data set", "k", "model", "I-AUROC"] and rows[0][-1] == "runs"
    assert [row[:4] + row[-1:] for row in rows[2:]] == [
        ["mvtec", "0", "winclip", "70.0 ± 2.9", "5"],
        ["mvtec", "1", "padim", "70.0 ± 5.0", "6"],
        ["mvtec", "1", "winclip", "**75.0 ± 0.0**", "6"],
        ["mvtec", "2", "padim", "86.0 ± 2.1", "5"],
    ]


def test_failed_and_missing_runs_name_their_k(report):
    markdown = (report / "results.md").read_text()
    failed = table_rows(markdown, "Failed runs (1)")
    assert failed[2][:3] == ["padim · mvtec/cable · k=2 · seed 2", "failed", "out of memory"]
    assert "## Missing runs (1)\n\n- winclip · mvtec/cable · k=0 · seed 2\n" in markdown
    assert "23 runs: 22 ok, 1 failed, 0 superseded; 1 missing." in markdown


def test_csv_files_carry_k(report):
    long = pd.read_csv(report / "results_long.csv")
    assert long.groupby(["model", "k_shot"]).size().to_dict() == {
        ("padim", 1): 6, ("padim", 2): 6, ("winclip", 0): 5, ("winclip", 1): 6}
    # k is identity, not an extra override
    assert long["overrides"].isna().all()
    mvtec = pd.read_csv(report / "results_mvtec.csv", header=[0, 1, 2], index_col=0)
    assert list(mvtec.columns[:2]) == [("0", "winclip", "image_auroc"), ("0", "winclip", "image_auroc_std")]
    assert mvtec.loc["bottle", ("1", "padim", "image_auroc")] == pytest.approx(0.8)
    assert mvtec.loc["bottle", ("1", "padim", "image_auroc_std")] == pytest.approx(0.1)
    assert mvtec.loc["mean", ("2", "padim", "image_auroc")] == pytest.approx(0.86)
    summary = pd.read_csv(report / "results_summary.csv", index_col=[0, 1, 2])
    assert summary.index.names == ["dataset", "k_shot", "model"]
    assert summary.loc[("mvtec", 1, "winclip"), "pixel_auroc"] == pytest.approx(0.75)
    assert summary.loc[("mvtec", 1, "padim"), "pixel_auroc_std"] == pytest.approx(0.05)


def test_k_groups_are_ordered_by_number_and_all_images_last():
    frame = pd.DataFrame({"k_shot": pd.array([10, None, 2, 0, None], dtype="Int64"),
                          "status": ["ok", "ok", "ok", "ok", "unreadable"]})
    assert shot_labels(frame) == ["0", "2", "10", "all"]
    assert shot_labels(frame.iloc[[1, 4]]) == []


def test_run_folders_name_k_before_the_seed():
    choices = {"model": "winclip", "backbone": "clip_vit_b16_plus_240", "dataset": "mvtec"}
    overrides = ["model=winclip", "dataset.k_shot=4", "seed=2"]
    assert run_folder_name(choices, overrides, "bottle", 2, 4) == "winclip-clip_vit_b16_plus_240-mvtec-bottle-k4-seed2"
    assert run_folder_name(choices, overrides, "bottle", 2, 0).endswith("-bottle-k0-seed2")
    assert run_folder_name(choices, ["model=winclip"], "bottle", 2) == "winclip-clip_vit_b16_plus_240-mvtec-bottle-seed2"


def test_fewshot_preset_sweeps_k_and_three_seeds_on_any_category():
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=fewshot", "dataset=mvtec", "dataset.category=cable",
                                           "dataset.k_shot=2"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert (params["dataset.k_shot"], params["seed"]) == ("1,2,4", "0,1,2")
    assert "dataset.category" not in params and "dataset" not in params
    assert (cfg.dataset.category, cfg.dataset.k_shot) == ("cable", 2)
    folder = OmegaConf.select(cfg, "hydra.sweep.subdir")
    assert folder == f"padim-{cfg.backbone.name}-mvtec-cable-k2-seed0"
