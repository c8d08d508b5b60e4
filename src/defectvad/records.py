# src/defectvad/records.py
import math
import subprocess

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad")


def read_git_commit(repo_dir):
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def format_metrics_table(metrics, timing):
    rows = [(key, "n/a" if value is None or math.isnan(value) else f"{value:.4f}") for key, value in
            ((key, metrics.get(key)) for key in METRIC_KEYS)]
    rows += [(key, f"{value:.1f}") for key, value in timing.items()]
    width = max(len(key) for key, _ in rows)
    line = "-" * (width + 12)
    return "\n".join([line] + [f"{key:<{width}}  {value:>8}" for key, value in rows] + [line])
