# tests/test_category_tables.py
import csv
import json

from defectvad.records import METRIC_KEYS
from test_aggregate import load_tool, write_run


def test_aggregate_shows_one_model_for_all_categories_beside_one_model_per_category(tmp_path):
    folder = tmp_path / "runs"
    write_run(folder, "padim", "mvtec", "bottle", 0, 0.90)
    write_run(folder, "padim", "mvtec", "cable", 0, 0.70)
    write_run(folder, "padim", "mvtec", "all", 0, 0.0)
    union = folder / "padim-mvtec-all-seed0" / "metrics.json"
    record = json.loads(union.read_text())
    record["metrics_per_category"] = {"bottle": {key: 0.80 for key in METRIC_KEYS},
                                      "cable": {key: 0.60 for key in METRIC_KEYS}}
    record["metrics"] = {key: 0.70 for key in METRIC_KEYS}
    union.write_text(json.dumps(record))
    out = tmp_path / "report"
    assert load_tool().main([str(folder), "--out", str(out), "--metrics", "all"]) == 0
    markdown = (out / "results.md").read_text()
    section = markdown.split("## mvtec\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [cell.strip() for cell in section[0].strip("|").split("|")]
    assert header[1] == "padim<br>I-AUROC" and header[9] == "padim · one model for all categories<br>I-AUROC"
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
             for line in section[2:]}
    assert (cells["bottle"][1], cells["bottle"][9]) == ("**90.0**", "80.0")
    assert (cells["cable"][1], cells["cable"][9]) == ("**70.0**", "60.0")
    assert (cells["mean"][1], cells["mean"][9]) == ("**80.0**", "70.0")
    assert "3 runs: 3 ok, 0 superseded; 0 missing." in markdown
    assert "one model for all categories` (or for a list)" in markdown
    long = list(csv.DictReader((out / "results_long.csv").open()))
    assert sorted((row["category"], row["setting"]) for row in long) == [
        ("bottle", "one model for all categories"), ("bottle", "one model per category"),
        ("cable", "one model for all categories"), ("cable", "one model per category")]
    summary = list(csv.DictReader((out / "results_summary.csv").open()))
    assert [(row["model"], row["runs"]) for row in summary] == [("padim", "2"),
                                                                ("padim · one model for all categories", "1")]
