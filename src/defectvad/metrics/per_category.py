# src/defectvad/metrics/per_category.py
# a run over several categories: each category's test images are judged on their own, and the run's
# metrics are the mean of the categories' metrics (not the metrics of the pooled images)
import numpy as np
import torch

from defectvad.metrics.evaluation import compute_metrics
from defectvad.records import METRIC_KEYS


def split_by_category(predictions, samples):
    # {category: index tensor into predictions}, in the order the categories first appear in samples
    category_of = {sample["image_path"]: sample["category"] for sample in samples}
    categories = list(dict.fromkeys(sample["category"] for sample in samples))
    found = [category_of[path] for path in predictions["image_path"]]
    return {name: torch.tensor([i for i, value in enumerate(found) if value == name], dtype=torch.long)
            for name in categories}


def compute_category_metrics(predictions, samples, fpr_limit, histograms=None):
    # histograms: {category: PixelHistogram} of a run whose maps were streamed (tiled or full resolution)
    per_category = {}
    for name, indices in split_by_category(predictions, samples).items():
        masks = predictions["mask"][indices, 0] if predictions["has_masks"] else None
        per_category[name] = compute_metrics(predictions["pred_score"][indices], predictions["label"][indices],
                                             predictions["anomaly_map"][indices, 0], masks, fpr_limit=fpr_limit,
                                             pixel_histogram=None if histograms is None else histograms[name])
    return per_category


def mean_metrics(per_category):
    # a nan in one category (one class only, no masks) makes the mean nan
    return {key: float(np.mean([metrics[key] for metrics in per_category.values()])) for key in METRIC_KEYS}
