# src/defectvad/records.py
import json
import math
import os
import subprocess
from pathlib import Path

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad")


def write_json_atomic(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, default=str, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
