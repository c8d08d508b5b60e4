# src/defectvad/sweeps/reports.py
import math
import os
import re
from pathlib import Path

import pandas as pd

from defectvad.atomic_files import read_json, write_text_atomic
from defectvad.sweeps.runs import IDENTITY, SETTING_EACH, read_runs
from defectvad.sweeps.tables import (COSTS, METRIC_NAMES, SUMMARY_METRICS, dataset_table, label_variants,
                                     order_categories, order_datasets, shot_label, summary_table, table_csv)

LEGEND = ("Values: metric x 100, mean ± std over seeds where there are several. **Bold**: the best of two or more "
          "models. –: no run. failed: no run ended ok. *: mean over fewer categories than the table has. "
          "k=N: N training images per run, picked by its seed (k=0: zero-shot; k=all: every image). "
          "A model named `one model for all categories` (or for a list) is one run trained on the union of those "
          "categories and judged on each; every other model is one run per category.")


def write_report(folders, out, metrics=SUMMARY_METRICS):
    folders, out = [Path(folder) for folder in folders], Path(out)
    frame = read_runs(folders)
    if frame.empty:
        raise FileNotFoundError(f"no metrics.json below {', '.join(map(str, folders))}")
    frame["variant"], variants, common = label_variants(frame)
    datasets = order_datasets(frame.loc[frame["status"] != "unreadable", "dataset"].dropna())
    tables = {dataset: dataset_table(frame, dataset, variants, metrics) for dataset in datasets}
    summary = summary_table(frame, {dataset: dataset_table(frame, dataset, variants, SUMMARY_METRICS)
                                    for dataset in datasets})
    missing = find_missing(frame, folders)

    out.mkdir(parents=True, exist_ok=True)
    long = frame.assign(overrides=frame["overrides"].map(join_overrides))
    write_text_atomic(out / "results_long.csv", long.to_csv(index=False))
    write_text_atomic(out / "results_summary.csv", table_csv(summary).to_csv())
    for dataset, table in tables.items():
        write_text_atomic(out / f"results_{dataset}.csv", table_csv(table).to_csv(index_label="category"))
    lines = header_markdown(frame, folders, out, common, missing)
    lines += ["## Summary", "", *summary_markdown(summary), ""]
    for dataset, table in tables.items():
        lines += [f"## {dataset}", "", *dataset_markdown(table, metrics), ""]
    write_text_atomic(out / "results.md", "\n".join(lines))
    return {"runs": frame["run_dir"].nunique(), "failed": int(failed_rows(frame).shape[0]), "missing": len(missing)}


def join_overrides(overrides):
    return " ".join(overrides) if isinstance(overrides, tuple) else ""


def failed_rows(frame):
    return frame[(frame["status"] != "ok") & ~frame["superseded"]]


def describe(row):
    if row["status"] == "unreadable":
        return "?"
    shot = shot_text(shot_label(row["k_shot"]))
    return f"{row['variant']} · {row['dataset']}/{row['category']}{shot} · seed {row['seed']}"


def shot_text(shot):
    return "" if shot == "all" else f" · k={shot}"


def find_missing(frame, folders):
    # a sweep's own job list where it has one (sweep.json), else every model x category x seed seen
    missing, unplanned = [], []
    for folder in folders:
        rows = frame[frame["sweep_dir"] == str(folder)]
        jobs = (read_json(folder / "sweep.json") or {}).get("jobs")
        if jobs is None:
            unplanned.append(rows)
            continue
        present = {os.path.relpath(run_dir, folder) for run_dir in rows["run_dir"]}
        missing += [f"`{folder.name}/{job['folder']}` never ran" for job in jobs if job["folder"] not in present]
    rows = pd.concat(unplanned) if unplanned else frame.iloc[:0]
    rows = rows[(rows["status"] != "unreadable") & ~rows["superseded"]]
    for dataset in order_datasets(rows["dataset"].dropna()):
        group = rows[rows["dataset"] == dataset]
        seen = set(zip(group["variant"], group["category"], group["seed"], group["k_shot"].map(shot_label)))
        # each model's own k values
        shots = group.assign(shot=group["k_shot"].map(shot_label)).groupby("variant")["shot"].unique()
        # a model trained on several categories covers only its own
        for variant in group.loc[group["setting"] == SETTING_EACH, "variant"].unique():
            for seed in sorted(group["seed"].dropna().unique()):
                for category in order_categories(dataset, group["category"]):
                    for shot in shots[variant]:
                        if (variant, category, seed, shot) not in seen:
                            missing.append(f"{variant} · {dataset}/{category}{shot_text(shot)} · seed {seed}")
    return missing


def header_markdown(frame, folders, out, common, missing):
    failed, superseded = failed_rows(frame), frame[frame["superseded"]]
    # a run over several categories has a row per category: counted once, by its folder
    counts = frame.loc[~frame["superseded"]].drop_duplicates("run_dir")["status"].value_counts()
    lines = ["# Results", "", f"Sweep folders: {', '.join(f'`{folder}`' for folder in folders)}.",
             f"{frame['run_dir'].nunique()} runs: " + ", ".join(f"{count} {status}" for status, count in counts.items())
             + f", {superseded['run_dir'].nunique()} superseded; {len(missing)} missing.", "", LEGEND]
    if common:
        lines += ["", "Overrides of every run: " + ", ".join(f"`{override}`" for override in common) + "."]
    lines.append("")
    if len(failed):
        lines += [f"## Failed runs ({len(failed)})", "",
                  *markdown_table(["run", "status", "error", "folder"],
                                  [[describe(row), row["status"], first_line(row["error"]), relative(row["run_dir"], out)]
                                   for _, row in failed.iterrows()]), ""]
    if missing:
        lines += [f"## Missing runs ({len(missing)})", "", *[f"- {text}" for text in missing], ""]
    if len(superseded):
        lines += ["## Runs found more than once: the newest (by run.finished) wins", ""]
        rows, keys = [], frame[IDENTITY].apply(lambda row: tuple(map(str, row)), axis=1)
        for index, row in superseded.iterrows():
            newest = frame[~frame["superseded"] & (keys == keys[index])].iloc[0]
            rows.append([describe(row), f"{relative(newest['run_dir'], out)} ({newest['finished']})",
                         f"{relative(row['run_dir'], out)} ({row['finished']})"])
        lines += [*markdown_table(["run", "used", "ignored"], rows), ""]
    return lines


def summary_markdown(summary):
    # a row group per data set, or per data set and k
    mean, std, state = summary["mean"], summary["std"], summary["state"]
    rows = []
    for head in mean.index.droplevel("model").unique():
        head = head if isinstance(head, tuple) else (head,)
        group = mean.loc[head if len(head) > 1 else head[0]]
        texts = {}
        for column in mean.columns:
            for variant in group.index:
                value = group.loc[variant, column]
                if column in SUMMARY_METRICS:
                    text = format_metric(value, std.loc[(*head, variant), column], summary["seeds"])
                    text += "*" if state[(*head, variant)] == "partial" else ""
                else:
                    text = format_cost(column, value)
                texts[(variant, column)] = text
            eligible = [variant for variant in group.index if column != "runs"
                        and (column not in SUMMARY_METRICS or state[(*head, variant)] == "ok")]
            for variant in best(group[column], eligible, higher=column in SUMMARY_METRICS, scale=scale_of(column)):
                texts[(variant, column)] = f"**{texts[(variant, column)]}**"
        rows += [[*head, variant, *[texts[(variant, column)] for column in mean.columns]] for variant in group.index]
    header = ["data set", *(["k"] if "k_shot" in mean.index.names else []), "model",
              *[METRIC_NAMES.get(column) or COSTS.get(column, (column,))[0] for column in mean.columns]]
    return markdown_table(header, rows)


def dataset_markdown(table, metrics):
    # a column group per k where the runs were given k training images
    header, rows = ["category"], [[category] for category in table["mean"].index]
    for shot, group in shot_groups(table):
        names, cells = variant_markdown(group, metrics)
        header += [f"k={shot}<br>{name}" if shot else name for name in names]
        rows = [row + more for row, more in zip(rows, cells)]
    return markdown_table(header, rows)


def shot_groups(table):
    if "k_shot" not in table["state"].columns.names:
        return [(None, table)]
    shots = table["state"].columns.get_level_values("k_shot").unique()
    return [(shot, {**table, **{key: table[key][shot] for key in ("mean", "std", "state")}}) for shot in shots]


def variant_markdown(table, metrics):
    mean, std, state = table["mean"], table["std"], table["state"]
    variants = list(state.columns)
    rows = []
    for category in mean.index:
        texts = {}
        for metric in metrics:
            values = mean.loc[category, [(variant, metric) for variant in variants]].droplevel("metric")
            for variant in variants:
                cell = state.loc[category, variant]
                text = {"missing": "–", "failed": "failed"}.get(cell) or format_metric(
                    values[variant], std.loc[category, (variant, metric)], table["seeds"])
                texts[(variant, metric)] = text + ("*" if cell == "partial" else "")
            eligible = [variant for variant in variants if state.loc[category, variant] == "ok"]
            for variant in best(values, eligible, higher=True, scale=100):
                texts[(variant, metric)] = f"**{texts[(variant, metric)]}**"
        rows.append([texts[(variant, metric)] for variant in variants for metric in metrics])
    return [f"{variant}<br>{METRIC_NAMES[metric]}" for variant in variants for metric in metrics], rows


def best(values, eligible, higher, scale):
    # compared as shown, so that equal-looking values are all bold; nothing is bold without a comparison
    shown = {key: round(float(values[key]) * scale, 1) for key in eligible if pd.notna(values[key])}
    if len(shown) < 2:
        return []
    target = max(shown.values()) if higher else min(shown.values())
    return [key for key, value in shown.items() if value == target]


def scale_of(column):
    return 100 if column in SUMMARY_METRICS else 1


def format_metric(mean, std, seeds):
    if mean is None or pd.isna(mean):
        return "n/a"
    text = f"{mean * 100:.1f}"
    return f"{text} ± {std * 100:.1f}" if seeds and pd.notna(std) else text


def format_cost(column, value):
    if pd.isna(value):
        return "n/a"
    if column == "runs":
        return str(int(value))
    return f"{value:.0f}" if column.endswith("_mb") else f"{value:.1f}"


def first_line(text):
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text[:200]


def relative(path, out):
    try:
        return os.path.relpath(path, out)
    except ValueError:
        return str(path)


def markdown_table(header, rows):
    def line(cells):
        return "| " + " | ".join(re.sub(r"\|", r"\\|", str(cell)) for cell in cells) + " |"

    return [line(header), "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|", *[line(row) for row in rows]]
