# tools/mvtec_ad2_submission.py
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def submit(args):
    from defectvad.engine.devices import set_threads
    from defectvad.errors import DefectVADError
    from defectvad.inference.mvtec_ad2_submission import write_submission
    from defectvad.inference.runs import TrainedRun
    from defectvad.metrics.thresholds import select_threshold

    run = TrainedRun(args.run_dir, args.device)
    set_threads(args.threads or run.cfg.hardware.threads)
    category = args.category or run.cfg.dataset.get("category")
    if not isinstance(category, str):
        raise DefectVADError(f"the run's dataset.category is {category!r}; name the category with --category")
    _, pixel_threshold, kind = select_threshold(run.thresholds, args.threshold)
    out = args.out or run.run_dir / "mvtec_ad2_submission"
    skipped = []
    counts = write_submission(run, args.dataset_root, category, args.test_sets, out, pixel_threshold,
                              args.batch_size or run.cfg.loader.eval_batch_size, skipped)
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        raise DefectVADError(f"{len(skipped)} images could not be read; the server needs a map for every test image")
    written = ", ".join(f"{count} of test_{name}" for name, count in counts.items())
    print(f"{category}: maps of {written} written to {out}/anomaly_images (float16 TIFF) and "
          f"{out}/anomaly_images_thresholded (PNG at pixel threshold {pixel_threshold:.6g}, {kind}); check the folder "
          f"with MVTec's check_and_prepare_data_for_upload.py before uploading")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the anomaly maps of MVTec AD 2's private test sets in the "
                                                 "layout MVTec's evaluation server reads")
    parser.add_argument("run_dir", type=Path, help="a finished run trained on one MVTec AD 2 category")
    parser.add_argument("dataset_root", type=Path, help="the folder that holds the MVTec AD 2 category folders")
    parser.add_argument("--category", help="default: the run's dataset.category")
    parser.add_argument("--test-sets", nargs="+", default=["private", "private_mixed"],
                        choices=["private", "private_mixed"])
    parser.add_argument("--out", type=Path, help="default: <run dir>/mvtec_ad2_submission")
    parser.add_argument("--threshold", help="the thresholded maps' pixel threshold: f1, normal or a number; default "
                                            "normal when the run has one, else f1")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, help="default: the run's loader.eval_batch_size")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU; default: the run's hardware.threads")
    args = parser.parse_args(argv)
    try:
        return submit(args)
    except Exception as error:
        from defectvad.errors import report_user_error

        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
