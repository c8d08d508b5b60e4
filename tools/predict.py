# tools/predict.py
import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectvad.errors import DefectVADError  # noqa: E402

COLUMNS = ("path", "score", "label", "threshold", "threshold_kind", "picture")
GRADE_COLUMNS = ("level", "type", "regions")


def name_pictures(paths):
    # one PNG name per image from its path below the images' common folder (good/000.png -> good_000.png)
    from defectvad.visualization.run_images import safe_name

    base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    names, taken = {}, set()
    for path in paths:
        relative = path.resolve().relative_to(base)
        name = safe_name("_".join(relative.with_suffix("").parts))
        if name in taken:
            name = safe_name(f"{name}_{path.suffix.lstrip('.')}")
        while name in taken:
            name += "_"
        taken.add(name)
        names[path] = name + ".png"
    return names


def predict(args):
    from defectvad.atomic_files import write_text_atomic
    from defectvad.data.images import read_image_size
    from defectvad.engine.devices import set_threads
    from defectvad.inference.predictions import find_images, predict_files
    from defectvad.inference.runs import TrainedRun
    from defectvad.metrics.thresholds import select_threshold
    from defectvad.visualization.panels import describe, draw_panel
    from defectvad.visualization.region_boxes import describe_grade, draw_region_boxes
    from defectvad.visualization.run_images import save_png

    run = TrainedRun(args.run_dir, args.device)
    if args.max_image_pixels is not None:
        from defectvad.data.images import check_max_image_pixels

        run.max_image_pixels = check_max_image_pixels(args.max_image_pixels)
    set_threads(args.threads or run.cfg.hardware.threads)
    image_threshold, pixel_threshold, kind = select_threshold(run.thresholds, args.threshold)
    paths = find_images(args.images)
    out = args.out or run.run_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    names = name_pictures(paths)
    batch_size = args.batch_size or run.cfg.loader.eval_batch_size
    grading = load_grading(run, args.no_grading)
    rows, graded, skipped = [], [], []
    for path, picture, score, anomaly_map in predict_files(run, paths, batch_size, skipped):
        label = int(score >= image_threshold)
        grade = None if grading is None else grading(picture, anomaly_map, read_image_size(path, "image"))
        picture_name = "" if args.no_pictures else names[path]
        if picture_name:
            caption = describe(f"{path.parent.name}/{path.name}", score, image_threshold, kind)
            caption += "" if grade is None else f"; {describe_grade(grade[0], grade[1])}"
            panel = draw_panel(picture, anomaly_map.numpy(), pixel_threshold, run.thresholds["map_range"], caption)
            if grade is not None:
                draw_region_boxes(panel, grade[2])
            save_png(panel, out / picture_name)
        rows.append({"path": str(path), "score": score, "label": label, "threshold": image_threshold,
                     "threshold_kind": kind, "picture": picture_name})
        if grade is not None:
            rows[-1].update({"level": grade[0], "type": grade[1], "regions": len(grade[2])})
            graded.append({**rows[-1], "regions": grade[2]})
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if not rows:
        raise DefectVADError(f"none of the {len(paths)} images could be read; nothing was predicted")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS + (GRADE_COLUMNS if grading else ()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "predictions.csv", text.getvalue())
    if grading is not None:
        write_text_atomic(out / "predictions.json", json.dumps(
            {"levels_from": grading.levels_from, "images": graded}, indent=1))
    anomalous = sum(row["label"] for row in rows)
    print(f"{len(rows)} images predicted with {run.name}, {anomalous} anomalous at threshold {image_threshold:.6g} "
          f"({kind}); {len(skipped)} skipped as unreadable; results in {out / 'predictions.csv'}")
    return 0


def load_grading(run, skip):
    # the run's severity levels, types and regions, when it graded its test images (grading.json)
    if skip or not (run.run_dir / "grading.json").is_file():
        return None
    from defectvad.grading.run_model import RunGrading

    return RunGrading(run)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Predict with a finished run: a score, a label and a picture "
                                                 "(image | heatmap | overlay) per image, and predictions.csv")
    parser.add_argument("run_dir", type=Path,
                        help="the run's folder (metrics.json with status ok, config.yaml, weights/)")
    parser.add_argument("images", help="an image, a folder (searched recursively) or a glob pattern in quotes")
    parser.add_argument("--out", type=Path,
                        help="where predictions.csv and the pictures go; default <run dir>/predictions")
    parser.add_argument("--threshold", help="f1 (F1-optimal on the run's test set), normal (from held-out normal "
                                            "images) or a number; default normal when the run has one, else f1")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, help="default: the run's loader.eval_batch_size")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU; default: the run's hardware.threads")
    parser.add_argument("--no-pictures", action="store_true", help="write predictions.csv only")
    parser.add_argument("--no-grading", action="store_true",
                        help="no severity level, defect type and regions (written when the run has grading.json: "
                             "level, type and region count in predictions.csv, the regions in predictions.json, "
                             "boxes on the pictures)")
    parser.add_argument("--max-image-pixels", type=int, help="read images up to this many pixels; default: the run's "
                                                              "dataset.max_image_pixels (null: PIL's default limit)")
    args = parser.parse_args(argv)
    try:
        return predict(args)
    except Exception as error:
        from defectvad.errors import report_user_error

        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
