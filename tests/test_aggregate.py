# tests/test_aggregate.py
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# every metric of a run is its image AUROC plus a fixed offset, so each table value can be written by hand
OFFSETS = {"image_auroc": 0.0, "image_ap": -0.01, "image_f1max": -0.02, "pixel_auroc": -0.10, "pixel_ap": -0.3,
           "pixel_f1max": -0.3, "aupro": -0.20, "mad": -0.05}
COSTS = {"padim": (2.0, 1.0, 1000.0), "stfpm": (4.0, 0.5, 1500.0)}


def load_tool():
    spec = importlib.util.spec_from_file_location("aggregate", ROOT / "tools" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder, model, dataset, category, seed, auroc=None, finished="2024-05-01T10:00:00+00:00", error=None):
    record = {
        "status": "ok" if error is None else "failed",
        "run": {"model": model, "backbone": "resnet18", "dataset": dataset, "category": category, "seed": seed,
                "image_size": [256, 256], "overrides": [f"model={model}", f"dataset.category={category}", "hardware=cpu"],
                "started": "2024-05-01T09:00:00+00:00", "finished": finished},
    }
    if error is None:
        fit_s, test_s, peak = COSTS[model]
        record.update(metrics={key: auroc + offset for key, offset in OFFSETS.items()},
                      timing={"fit_s": fit_s, "test_s": test_s}, resources={"peak_rss_mb": peak})
    else:
        record.update(error=error, traceback="Traceback (most recent call last): ...")
    run_dir = folder / f"{model}-{dataset}-{category}-seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    first, second = root / "first", root / "second"
    # categories written out of their official order
    for seed, cable, bottle in ((0, 0.80, 0.50), (1, 0.84, 0.92)):
        write_run(first, "padim", "mvtec", "cable", seed, cable)
        write_run(first, "padim", "mvtec", "bottle", seed, bottle)
    # the same run again, finished later: it replaces the 0.50 above
    write_run(second, "padim", "mvtec", "bottle", 0, 0.90, finished="2024-05-02T10:00:00+00:00")
    for seed in (0, 1):
        write_run(first, "stfpm", "mvtec", "bottle", seed, 0.95)
    write_run(first, "stfpm", "mvtec", "cable", 0, 0.70)
    write_run(first, "stfpm", "mvtec", "cable", 1, error="CUDA out of memory\nsecond line")
    write_run(second, "padim", "visa", "candle", 0, 0.60)
    write_run(second, "stfpm", "visa", "candle", 0, 0.80)
    write_run(second, "stfpm", "visa", "capsules", 0, 0.70)
    out = root / "report"
    assert load_tool().main([str(first), str(second), "--out", str(out)]) == 0
    return out


def table_rows(markdown, title):
    section = markdown.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()]


def test_dataset_table_has_categories_in_official_order_seed_mean_and_std_and_bold_best(report):
    rows = table_rows((report / "results.md").read_text(), "mvtec")
    assert rows[0] == ["category", "padim<br>I-AUROC", "padim<br>P-AUROC", "padim<br>AUPRO", "padim<br>mAD",
                       "stfpm<br>I-AUROC", "stfpm<br>P-AUROC", "stfpm<br>AUPRO", "stfpm<br>mAD"]
    assert rows[2] == ["bottle", "91.0 ± 1.4", "81.0 ± 1.4", "71.0 ± 1.4", "86.0 ± 1.4",
                       "**95.0 ± 0.0**", "**85.0 ± 0.0**", "**75.0 ± 0.0**", "**90.0 ± 0.0**"]
    # stfpm's second seed failed on cable: one seed, no std
    assert rows[3] == ["cable", "**82.0 ± 2.8**", "**72.0 ± 2.8**", "**62.0 ± 2.8**", "**77.0 ± 2.8**",
                       "70.0", "60.0", "50.0", "65.0"]
    # mean over categories; std over the seeds' category means (0.85, 0.88) and (0.825, 0.95)
    assert rows[4] == ["mean", "**86.5 ± 2.1**", "**76.5 ± 2.1**", "**66.5 ± 2.1**", "**81.5 ± 2.1**",
                       "82.5 ± 8.8", "72.5 ± 8.8", "62.5 ± 8.8", "77.5 ± 8.8"]
    assert len(rows) == 5


def test_incomplete_model_is_marked_and_never_bold(report):
    rows = table_rows((report / "results.md").read_text(), "visa")
    assert rows[2:] == [["candle", "60.0", "50.0", "40.0", "55.0", "**80.0**", "**70.0**", "**60.0**", "**75.0**"],
                        ["capsules", "–", "–", "–", "–", "70.0", "60.0", "50.0", "65.0"],
                        ["mean", "60.0*", "50.0*", "40.0*", "55.0*", "75.0", "65.0", "55.0", "70.0"]]


def test_summary_has_models_by_data_sets_with_costs(report):
    rows = table_rows((report / "results.md").read_text(), "Summary")
    assert rows[0] == ["data set", "model", "I-AUROC", "P-AUROC", "AUPRO", "mAD", "fit s", "test s", "peak RSS MB", "runs"]
    assert rows[2:] == [
        ["mvtec", "padim", "**86.5 ± 2.1**", "**76.5 ± 2.1**", "**66.5 ± 2.1**", "**81.5 ± 2.1**", "**2.0**", "1.0",
         "**1000**", "4"],
        ["mvtec", "stfpm", "82.5 ± 8.8", "72.5 ± 8.8", "62.5 ± 8.8", "77.5 ± 8.8", "4.0", "**0.5**", "1500", "3"],
        ["visa", "padim", "60.0*", "50.0*", "40.0*", "55.0*", "**2.0**", "1.0", "**1000**", "1"],
        ["visa", "stfpm", "75.0", "65.0", "55.0", "70.0", "4.0", "**0.5**", "1500", "2"],
    ]


def test_failed_missing_and_replaced_runs_are_listed_first(report):
    markdown = (report / "results.md").read_text()
    head = markdown.split("## Summary")[0]
    assert "12 runs: 10 ok, 1 failed, 1 superseded; 1 missing." in head
    assert "Overrides of every run: `hardware=cpu`." in head
    failed = table_rows(markdown, "Failed runs (1)")
    assert failed[2] == ["stfpm · mvtec/cable · seed 1", "failed", "CUDA out of memory",
                         str(Path("..") / "first" / "stfpm-mvtec-cable-seed1")]
    assert "## Missing runs (1)\n\n- padim · visa/capsules · seed 0\n" in markdown
    replaced = table_rows(markdown, "Runs found more than once: the newest (by run.finished) wins")
    assert replaced[2] == ["padim · mvtec/bottle · seed 0",
                           str(Path("..") / "second" / "padim-mvtec-bottle-seed0") + " (2024-05-02T10:00:00+00:00)",
                           str(Path("..") / "first" / "padim-mvtec-bottle-seed0") + " (2024-05-01T10:00:00+00:00)"]


def test_csv_files_hold_raw_values(report):
    long = pd.read_csv(report / "results_long.csv")
    assert len(long) == 12
    assert long["status"].value_counts().to_dict() == {"ok": 11, "failed": 1}
    assert long["superseded"].sum() == 1
    assert long.loc[long["superseded"], "image_auroc"].tolist() == [0.5]
    assert {"model", "backbone", "dataset", "category", "seed", "mad", "aupro", "fit_s", "test_s", "peak_rss_mb",
            "status", "error", "finished"} <= set(long.columns)
    mvtec = pd.read_csv(report / "results_mvtec.csv", header=[0, 1], index_col=0)
    assert list(mvtec.index) == ["bottle", "cable", "mean"]
    assert list(mvtec.columns[:2]) == [("padim", "image_auroc"), ("padim", "image_auroc_std")]
    assert mvtec.loc["bottle", ("padim", "image_auroc")] == pytest.approx(0.91)
    assert mvtec.loc["mean", ("stfpm", "mad")] == pytest.approx(0.775)
    assert mvtec.loc["mean", ("padim", "image_auroc_std")] == pytest.approx(0.0212132, abs=1e-6)
    summary = pd.read_csv(report / "results_summary.csv", index_col=[0, 1])
    assert summary.loc[("visa", "stfpm"), "pixel_auroc"] == pytest.approx(0.65)
    assert summary.loc[("mvtec", "stfpm"), "runs"] == 3
    assert summary.loc[("mvtec", "padim"), "peak_rss_mb"] == 1000


def test_metrics_option_and_missing_folder(tmp_path, capsys):
    tool = load_tool()
    write_run(tmp_path / "one", "padim", "btad", "02", 0, 0.9)
    assert tool.main([str(tmp_path / "one"), "--metrics", "image_ap,pixel_f1max"]) == 0
    rows = table_rows((tmp_path / "one" / "results.md").read_text(), "btad")
    assert rows[0] == ["category", "padim<br>I-AP", "padim<br>P-F1max"]
    assert rows[2] == ["02", "89.0", "60.0"]
    (tmp_path / "empty").mkdir()
    assert tool.main([str(tmp_path / "empty")]) == 1
    assert "no metrics.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "one"), "--metrics", "accuracy"])


def test_runs_of_a_sweeps_job_list_that_never_ran_are_missing(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "padim", "mvtec", "bottle", 0, 0.9)
    jobs = [{"folder": "padim-mvtec-bottle-seed0", "overrides": ["dataset.category=bottle"]},
            {"folder": "padim-mvtec-cable-seed0", "overrides": ["dataset.category=cable"]}]
    (sweep / "sweep.json").write_text(json.dumps({"name": "sweep", "jobs": jobs}))
    assert load_tool().main([str(sweep)]) == 0
    markdown = (sweep / "results.md").read_text()
    assert "1 runs: 1 ok, 0 superseded; 1 missing." in markdown
    assert "## Missing runs (1)\n\n- `sweep/padim-mvtec-cable-seed0` never ran\n" in markdown
