# src/defectvad/metrics/thresholds.py
import math

import numpy as np

from defectvad.errors import ConfigError

F1_NOTE = ("image and pixel thresholds that maximise F1 on the test set itself (optimistic: fit on the images "
           "they are evaluated on); predicted anomalous when score >= threshold")
NORMAL_NOTE = ("the quantile of the scores of normal training images held out from training (evaluation.holdout): "
               "image, of their image scores; pixel, of their largest anomaly-map value, so about (1 - quantile) of "
               "normal images get any region outlined")


def fit_thresholds(metrics, maps, holdout=None, quantile=0.99, labels=None):
    # metrics: compute_metrics on the test set; maps: the test anomaly maps (colour scale of the pictures, anchored
    # on the held-out normal maps, else on those of the test images labelled 0); holdout: predict() on the
    # held-out normal images, or None
    from defectvad.visualization.colour_range import choose_map_range

    if holdout is not None:
        normal_maps = holdout["anomaly_map"]
    elif labels is not None and (labels == 0).any():
        normal_maps = maps[labels == 0]
    else:
        normal_maps = None
    map_range, range_note = choose_map_range(maps, normal_maps)
    thresholds = {
        "f1_test": {"image": metrics["image_f1_threshold"], "pixel": metrics["pixel_f1_threshold"], "note": F1_NOTE},
        "normal": None,
        "map_range": map_range,
        "map_range_note": range_note,
    }
    if holdout is not None:
        scores = holdout["pred_score"].double().numpy()
        peaks = holdout["anomaly_map"].flatten(1).amax(1).double().numpy()
        thresholds["normal"] = {
            "image": float(np.quantile(scores, quantile)),
            "pixel": float(np.quantile(peaks, quantile)),
            "quantile": quantile,
            "images": int(scores.size),
            "note": NORMAL_NOTE,
        }
    return thresholds


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def select_threshold(thresholds, choice=None):
    # (image threshold, pixel threshold, kind) for "f1", "normal", a number, or None (normal when stored, else f1)
    normal = thresholds.get("normal")
    if choice is None:
        choice = "normal" if normal else "f1"
    if choice == "normal":
        if not normal:
            raise ConfigError("this run has no normal-only threshold (it was trained with evaluation.holdout=0); "
                              "use --threshold f1 or a number, or train again with evaluation.holdout=20")
        return normal["image"], normal["pixel"], "normal"
    if choice in ("f1", "f1_test"):
        f1 = thresholds["f1_test"]
        if not is_number(f1["image"]):
            instead = "--threshold normal or a number" if normal else "a number: --threshold=<value>"
            raise ConfigError(f"this run has no F1 threshold (its test set had no anomalous or no normal images); "
                              f"use {instead}")
        # without masks there is no pixel threshold: the region outline uses the image threshold
        pixel = f1["pixel"] if is_number(f1["pixel"]) else f1["image"]
        return f1["image"], pixel, "f1_test"
    try:
        value = float(choice)
    except (TypeError, ValueError):
        raise ConfigError(f"unknown threshold '{choice}'; choose f1, normal or a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"the threshold must be a finite number, got {choice}")
    return value, value, "value"
