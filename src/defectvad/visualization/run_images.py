# src/defectvad/visualization/run_images.py
import re
from pathlib import Path

from defectvad.atomic_files import atomic_write
from defectvad.metrics.thresholds import is_number
from defectvad.visualization.panels import describe, draw_panel
from defectvad.visualization.plots import draw_roc_curve, draw_score_histogram
from defectvad.visualization.region_boxes import describe_grade, draw_region_boxes


def save_png(figure, path):
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=figure.dpi, pil_kwargs={"compress_level": 1})
    return Path(path)


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "image"


def pick_examples(defect_types, per_type):
    # the first `per_type` test images of each defect type, in test-set order
    picked, seen = [], {}
    for index, defect_type in enumerate(defect_types):
        if seen.get(defect_type, 0) < per_type:
            seen[defect_type] = seen.get(defect_type, 0) + 1
            picked.append(index)
    return picked


def pick_errors(scores, labels, threshold, count):
    # worst false positives (normal, highest scores at or above the threshold) and false negatives
    # (anomalous, lowest scores below it)
    positives = [i for i in range(len(scores)) if labels[i] == 0 and scores[i] >= threshold]
    negatives = [i for i in range(len(scores)) if labels[i] == 1 and scores[i] < threshold]
    positives.sort(key=lambda i: -scores[i])
    negatives.sort(key=lambda i: scores[i])
    return positives[:count], negatives[:count]


def write_run_images(folder, predictions, defect_types, thresholds, load_image, per_type=3, grades=None):
    # overlays of a few test images per defect type and of the worst errors at the F1 threshold,
    # the ROC curve and the score histogram; load_image(path) gives the (3, H, W) picture the model saw; grades:
    # {image path: its grading.json entry}, whose level, type and region boxes are drawn on the overlay
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    scores = predictions["pred_score"].tolist()
    labels = [int(label) for label in predictions["label"].tolist()]
    paths = predictions["image_path"]
    f1 = thresholds["f1_test"]
    image_threshold = f1["image"] if is_number(f1["image"]) else float("inf")
    pixel_threshold = f1["pixel"] if is_number(f1["pixel"]) else image_threshold
    written = []

    def write(index, prefix):
        mask = predictions["mask"][index, 0].numpy() if predictions["has_masks"] else None
        name = f"{defect_types[index]}/{Path(paths[index]).name}"
        caption = describe(name, scores[index], image_threshold, "f1_test")
        grade = (grades or {}).get(paths[index])
        if grade is not None:
            caption += f"; {describe_grade(grade['level'], grade['type'])}"
        panel = draw_panel(load_image(paths[index]), predictions["anomaly_map"][index, 0].numpy(), pixel_threshold,
                           thresholds["map_range"], caption, mask)
        if grade is not None:
            draw_region_boxes(panel, grade["regions"])
        name = safe_name(f"{prefix}{defect_types[index]}_{Path(paths[index]).stem}") + ".png"
        written.append(save_png(panel, folder / name))

    for index in pick_examples(defect_types, per_type):
        write(index, "")
    if is_number(f1["image"]):
        false_positives, false_negatives = pick_errors(scores, labels, image_threshold, per_type)
        for rank, index in enumerate(false_positives, 1):
            write(index, f"false_positive_{rank}_")
        for rank, index in enumerate(false_negatives, 1):
            write(index, f"false_negative_{rank}_")
    normal = thresholds.get("normal") or {}
    lines = [("f1_test", f1["image"]), ("normal", normal.get("image"))]
    written.append(save_png(draw_roc_curve(scores, labels), folder / "roc_curve.png"))
    written.append(save_png(draw_score_histogram(scores, labels, lines), folder / "score_histogram.png"))
    return written
