# src/defectvad/metrics/multi_view.py
# objects photographed from several views (Real-IAD's C1..C5): an object's score is the largest score of its views,
# and it is anomalous when any of its views is, as Real-IAD's evaluation tool ADEval scores samples (s_auroc, s_aupr)
import numpy as np

from defectvad.metrics.evaluation import sweep_metrics
from defectvad.metrics.sweep import sort_labels


def group_views(predictions, samples):
    # (object ids in order of first appearance, object score, object label, views per object)
    objects = {sample["image_path"]: sample["object"] for sample in samples}
    scores, labels, views = {}, {}, {}
    for path, score, label in zip(predictions["image_path"], predictions["pred_score"].tolist(),
                                  predictions["label"].tolist()):
        key = objects[path]
        scores[key] = max(scores.get(key, -np.inf), score)
        labels[key] = max(labels.get(key, 0), int(label))
        views[key] = views.get(key, 0) + 1
    keys = list(scores)
    return keys, np.array([scores[k] for k in keys]), np.array([labels[k] for k in keys]), [views[k] for k in keys]


def compute_object_metrics(predictions, samples):
    keys, scores, labels, views = group_views(predictions, samples)
    result = sweep_metrics(*sort_labels(scores, labels))
    return {
        "object_auroc": result["auroc"], "object_ap": result["ap"], "object_f1max": result["f1max"],
        "objects": len(keys), "anomalous_objects": int(labels.sum()),
        "views_per_object": {"min": min(views), "max": max(views)},
        "rule": "an object's score is the largest pred_score of its views; it is anomalous when any view is; the "
                "metrics block judges each view on its own",
    }
