# src/defectvad/sweeps/tables.py
import numpy as np
import pandas as pd

from defectvad.records import METRIC_KEYS
from defectvad.sweeps.runs import SETTING_EACH

METRIC_NAMES = dict(zip(METRIC_KEYS, ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")))
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "mad")
# how each cost is summarised over the runs of a model on a data set
COSTS = {"fit_s": ("fit s", "mean"), "test_s": ("test s", "mean"), "peak_rss_mb": ("peak RSS MB", "max"),
         "peak_cuda_mb": ("peak GPU MB", "max")}
DATASET_ORDER = ("mvtec", "visa", "btad", "synthetic", "folder")


def official_categories(dataset):
    from defectvad.data.btad import BTADDataset
    from defectvad.data.mvtec import MVTecDataset
    from defectvad.data.synthetic import SyntheticDataset
    from defectvad.data.visa import VisaDataset

    classes = {"mvtec": MVTecDataset, "visa": VisaDataset, "btad": BTADDataset, "synthetic": SyntheticDataset}
    return list(classes[dataset].CATEGORIES) if dataset in classes else []


def order_datasets(datasets):
    datasets = set(datasets)
    return [name for name in DATASET_ORDER if name in datasets] + sorted(datasets - set(DATASET_ORDER))


def order_categories(dataset, categories):
    categories = set(categories)
    official = official_categories(dataset)
    return [name for name in official if name in categories] + sorted(categories - set(official))


def label_variants(frame):
    # a column group per model; the backbone and overrides join its name where they differ between runs
    readable = frame[frame["status"] != "unreadable"]
    common = set.intersection(*(set(overrides) for overrides in readable["overrides"])) if len(readable) else set()
    several_backbones = readable["backbone"].nunique() > 1
    keys = {}
    for index, row in readable.iterrows():
        extras = tuple(override for override in row["overrides"] if override not in common)
        # a model trained on several categories is named by its setting: never mixed with one-per-category runs
        setting = "" if row["setting"] in (SETTING_EACH, None) or pd.isna(row["setting"]) else row["setting"]
        keys[index] = (row["model"], row["backbone"] if several_backbones else "", extras, setting)
    labels = {key: " · ".join(filter(None, [key[0], key[1], " ".join(key[2]), key[3]])) for key in keys.values()}
    order = [labels[key] for key in sorted(set(keys.values()), key=lambda key: (str(key[0]), str(key[1]), *key[2:]))]
    return pd.Series({index: labels[key] for index, key in keys.items()}, dtype=object), order, sorted(common)


def shot_label(k_shot):
    return "all" if pd.isna(k_shot) else str(int(k_shot))


def shot_labels(frame):
    # the k groups, by number of training images, all (every image) last; none where no run was given a k
    shots = frame.loc[frame["status"] != "unreadable", "k_shot"]
    if shots.isna().all():
        return []
    return [str(int(shot)) for shot in sorted(shots.dropna().unique())] + (["all"] if shots.isna().any() else [])


def dataset_table(frame, dataset, variants, metrics):
    # categories x (model, metric), or x (k, model, metric) where runs were given k training images
    rows = frame[(frame["dataset"] == dataset) & ~frame["superseded"]]
    categories = order_categories(dataset, rows["category"])
    parts = {shot: variant_table(rows[rows["k_shot"].map(shot_label) == shot], categories, variants, metrics)
             for shot in shot_labels(frame)}
    parts = {shot: part for shot, part in parts.items() if len(part["state"].columns)}
    if not parts:
        return variant_table(rows, categories, variants, metrics)
    table = {key: pd.concat({shot: part[key] for shot, part in parts.items()}, axis=1, names=["k_shot"])
             for key in ("mean", "std", "state")}
    return {**table, "seeds": any(part["seeds"] for part in parts.values())}


def variant_table(rows, categories, variants, metrics):
    # categories x (model, metric): mean over seeds, std over seeds, and a state per cell
    variants = [variant for variant in variants if variant in set(rows["variant"])]
    index = categories + ["mean"]
    columns = pd.MultiIndex.from_product([variants, list(metrics)], names=["model", "metric"])
    mean = pd.DataFrame(np.nan, index=index, columns=columns)
    std = mean.copy()
    state = pd.DataFrame("missing", index=index, columns=variants)
    ok = rows[rows["status"] == "ok"]
    for variant in variants:
        state.loc[rows.loc[rows["variant"] == variant, "category"].unique(), variant] = "failed"
        good = ok[ok["variant"] == variant]
        if good.empty:
            continue
        cells = good.groupby("category")[list(metrics)]
        cell_mean = cells.mean()
        targets = [(variant, metric) for metric in metrics]
        mean.loc[cell_mean.index, targets] = cell_mean.to_numpy()
        std.loc[cell_mean.index, targets] = cells.std().to_numpy()
        state.loc[cell_mean.index, variant] = "ok"
        mean.loc["mean", targets] = cell_mean.mean().to_numpy()
        per_seed = good.groupby("seed")[list(metrics)].mean()
        std.loc["mean", targets] = per_seed.std().to_numpy() if len(per_seed) > 1 else np.nan
        state.loc["mean", variant] = "ok" if len(cell_mean) == len(index) - 1 else "partial"
    return {"mean": mean, "std": std, "state": state, "seeds": ok["seed"].nunique() > 1}


def summary_table(frame, tables):
    # (data set, model) or (data set, k, model) x summary metrics and costs, from the data set tables' mean rows
    rows, stds, states, index = [], [], [], []
    costs = [key for key in COSTS if frame[key].notna().any()]
    for dataset, table in tables.items():
        for column in table["state"].columns:
            key = column if isinstance(column, tuple) else (column,)
            runs = frame[(frame["dataset"] == dataset) & (frame["variant"] == key[-1]) & ~frame["superseded"]
                         & (frame["status"] == "ok")]
            if len(key) > 1:
                runs = runs[runs["k_shot"].map(shot_label) == key[0]]
            row = {metric: table["mean"].loc["mean", (*key, metric)] for metric in SUMMARY_METRICS}
            row.update({key: runs[key].agg(COSTS[key][1]) for key in costs})
            row["runs"] = runs["run_dir"].nunique()  # a run over several categories has a row per category
            rows.append(row)
            stds.append({metric: table["std"].loc["mean", (*key, metric)] for metric in SUMMARY_METRICS})
            states.append(table["state"].loc["mean", column])
            index.append((dataset, *key))
    names = ["dataset", "k_shot", "model"] if any(len(entry) > 2 for entry in index) else ["dataset", "model"]
    index = pd.MultiIndex.from_tuples(index, names=names)
    columns = [*SUMMARY_METRICS, *costs, "runs"]
    return {"mean": pd.DataFrame(rows, index=index, columns=columns),
            "std": pd.DataFrame(stds, index=index, columns=list(SUMMARY_METRICS)).astype(float),
            "state": pd.Series(states, index=index, dtype=object),
            "seeds": any(table["seeds"] for table in tables.values())}


def table_csv(table):
    # raw values in [0, 1]; a <metric>_std column after each metric where there are several seeds
    if not table["seeds"]:
        return table["mean"]
    columns = {}
    for column in table["mean"].columns:
        columns[column] = table["mean"][column]
        if column in table["std"].columns:
            columns[std_name(column)] = table["std"][column]
    frame = pd.DataFrame(columns, index=table["mean"].index)
    frame.columns.names = table["mean"].columns.names
    return frame


def std_name(column):
    return (*column[:-1], f"{column[-1]}_std") if isinstance(column, tuple) else f"{column}_std"
