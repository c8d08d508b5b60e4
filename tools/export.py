# tools/export.py
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CHECK_IMAGES = 3


def export(args):
    from defectvad.atomic_files import atomic_write
    from defectvad.data.images import PIXEL_RULE
    from defectvad.errors import ExportError
    from defectvad.export.onnx_export import (TOLERANCE, add_metadata, compare_with_torch, describe_report,
                                              export_onnx, import_onnxruntime, within_tolerance)
    from defectvad.inference.runs import TrainedRun

    import_onnxruntime()
    run = TrainedRun(args.run_dir, "cpu")
    if not run.trainer.exportable:
        raise ExportError(f"{run.name} cannot be exported to ONNX: its traced graph keeps the batch size it was "
                          f"traced with (the model declares exportable = False)")
    out = args.out or run.run_dir / "export" / "model.onnx"
    # traced with 2 images, checked with 3 others: a graph that kept the trace's batch size fails the check
    with atomic_write(out) as tmp:
        export_onnx(run.model, tmp, run.example_inputs(2, seed=0), run.name)
        report = compare_with_torch(tmp, run.model, run.example_inputs(CHECK_IMAGES, seed=1))
        differences = describe_report(report)
        if not within_tolerance(report):
            raise ExportError(f"{run.name} cannot be exported to ONNX faithfully: onnxruntime and PyTorch differ "
                              f"({differences}; allowed {TOLERANCE:g} relative); its inference holds Python control "
                              f"flow or data-dependent shapes that tracing cannot record")
        normalize = {"mean": list(run.transform.mean), "std": list(run.transform.std)} if run.normalize else None
        add_metadata(tmp, {"model": run.record["run"].get("model"), "backbone": run.record["run"].get("backbone"),
                           "input_shape": run.image_shape, "input_range": f"{PIXEL_RULE}, then normalised"
                           if normalize else PIXEL_RULE, "normalize": normalize, "thresholds": run.thresholds,
                           "run_dir": str(run.run_dir)})
    shape = "x".join(str(n) for n in run.image_shape)
    kind = "normalised " if run.normalize else ""
    print(f"wrote {out}: {kind}image (batch, {shape}) -> pred_score (batch,), anomaly_map (batch, 1, "
          f"{run.image_shape[1]}, {run.image_shape[2]})")
    print(f"onnxruntime vs PyTorch on {CHECK_IMAGES} images: {differences}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a finished run's model to one file that maps an image batch "
                                                 "to pred_score and anomaly_map, checked against PyTorch")
    parser.add_argument("run_dir", type=Path,
                        help="the run's folder (metrics.json with status ok, config.yaml, weights/)")
    parser.add_argument("--format", default="onnx", choices=("onnx",))
    parser.add_argument("--out", type=Path, help="the file to write; default <run dir>/export/model.onnx")
    args = parser.parse_args(argv)
    try:
        return export(args)
    except Exception as error:
        from defectvad.errors import report_user_error

        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
