# tools/aggregate.py
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectvad.records import METRIC_KEYS  # noqa: E402
from defectvad.sweeps.reports import write_report  # noqa: E402
from defectvad.sweeps.tables import SUMMARY_METRICS  # noqa: E402


def parse_metrics(text):
    metrics = list(METRIC_KEYS) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRIC_KEYS]
    if unknown or not metrics:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRIC_KEYS)} or all")
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tables from every metrics.json below sweep folders: results.md, "
                                                 "results_long.csv, results_summary.csv, results_<data set>.csv")
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders (multirun/<name>) or any folders of runs")
    parser.add_argument("--out", type=Path, help="where the files go; default: the folder, or the folders' common parent")
    parser.add_argument("--metrics", type=parse_metrics, default=list(SUMMARY_METRICS),
                        help=f"metrics of the per data set tables, comma-separated or all; default {','.join(SUMMARY_METRICS)}")
    args = parser.parse_args(argv)
    absent = [str(folder) for folder in args.folders if not folder.is_dir()]
    if absent:
        parser.error(f"not a folder: {', '.join(absent)}")
    folders = [folder.resolve() for folder in args.folders]
    out = args.out or (folders[0] if len(folders) == 1 else Path(*Path(folders[0]).parts[:common_depth(folders)]))
    try:
        report = write_report(folders, out, args.metrics)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{report['runs']} runs, {report['failed']} not ok, {report['missing']} missing: {out / 'results.md'}")
    return 0


def common_depth(folders):
    depth = 0
    for parts in zip(*(folder.parts for folder in folders)):
        if len(set(parts)) > 1:
            break
        depth += 1
    return depth


if __name__ == "__main__":
    sys.exit(main())
