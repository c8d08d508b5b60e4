# src/defectvad/sweeps/runs.py
from pathlib import Path

import pandas as pd

from defectvad.records import METRIC_KEYS
from defectvad.sweeps.folders import extra_overrides, find_runs, option_key

SETTING_EACH = "one model per category"
SETTING_ALL = "one model for all categories"
IDENTITY = ["model", "backbone", "dataset", "category", "k_shot", "seed", "overrides", "setting"]
COSTS = ["fit_s", "test_s", "peak_rss_mb", "peak_cuda_mb"]
COLUMNS = ["sweep_dir", "run_dir", *IDENTITY, "image_size", "status", "error", *METRIC_KEYS, *COSTS, "device",
           "started", "finished", "git_commit"]


def read_runs(folders):
    # one row per metrics.json below the folders; superseded: a newer run of the same identity exists
    rows = [row for folder in folders for path, record in find_runs(folder)
            for row in split_categories(read_row(Path(folder), path, record), record)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["seed"] = frame["seed"].astype("Int64")
    frame["k_shot"] = frame["k_shot"].astype("Int64")
    frame["superseded"] = mark_superseded(frame)
    return frame


def read_row(folder, path, record):
    row = {"sweep_dir": str(folder), "run_dir": str(path.parent)}
    if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
        return {**row, "status": "unreadable", "error": "metrics.json is not a run record"}
    run = record["run"]
    overrides = [str(override) for override in run.get("overrides") or []]
    row.update({key: run.get(key) for key in ("model", "backbone", "dataset", "started", "finished", "git_commit")})
    # a seed the run refused (seed=abc) is no seed
    seed = run.get("seed") if isinstance(run.get("seed"), int) and not isinstance(run.get("seed"), bool) else None
    row.update(category=describe_category(run.get("category")), setting=describe_setting(run.get("category")),
               seed=seed, overrides=tuple(extra_overrides(overrides)),
               image_size="x".join(str(size) for size in run.get("image_size") or []))
    row["k_shot"] = read_k_shot(record, overrides)
    row.update(status=record.get("status"), error=record.get("error"))
    row.update({key: (record.get("metrics") or {}).get(key) for key in METRIC_KEYS})
    costs = {**(record.get("timing") or {}), **(record.get("resources") or {})}
    row.update({key: costs.get(key) for key in COSTS})
    row["device"] = (record.get("environment") or {}).get("device")
    return row


def describe_category(category):
    return ",".join(map(str, category)) if isinstance(category, list) else str(category)


def describe_setting(category):
    # one model per category, or one model trained on several categories (dataset.category=all or a list)
    if category == "all":
        return SETTING_ALL
    if isinstance(category, list):
        return f"one model for {', '.join(map(str, category))}"
    return SETTING_EACH


def split_categories(row, record):
    # a run over several categories: one row per category, with that category's metrics
    per_category = record.get("metrics_per_category") if isinstance(record, dict) else None
    if row.get("status") != "ok" or not isinstance(per_category, dict):
        return [row]
    return [{**row, "category": str(name), **{key: (metrics or {}).get(key) for key in METRIC_KEYS}}
            for name, metrics in per_category.items()]


def read_k_shot(record, overrides):
    # training images the run took (null: all); a zero-shot run took none; a run that failed before its
    # evaluation has only the dataset.k_shot of its command
    evaluation = record.get("evaluation")
    if isinstance(evaluation, dict):
        return 0 if evaluation.get("learning_type") == "zero_shot" else whole_number(evaluation.get("k_shot"))
    given = [override.split("=", 1)[1] for override in overrides if option_key(override) == "dataset.k_shot"]
    return int(given[-1]) if given and given[-1].isdigit() else None


def whole_number(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def mark_superseded(frame):
    readable = frame[frame["status"] != "unreadable"]
    finished = pd.to_datetime(readable["finished"], utc=True, errors="coerce", format="ISO8601")
    # ties and runs that never finished keep the order the folders were given in
    newest = readable.loc[finished.sort_values(na_position="first", kind="stable").index]
    kept = newest.drop_duplicates(IDENTITY, keep="last").index
    return frame.index.isin(readable.index) & ~frame.index.isin(kept)
