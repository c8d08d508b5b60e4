# benchmarks/cpu_cost.py
# what each model costs on this machine: its anomalib preset (experiment=<name>: backbone, input size, batch sizes)
# on the synthetic default category with random backbone weights, cut to a few optimizer steps, timed and measured
# (fit s, test s, peak RSS of the whole process). Tells a user which models need a GPU.
#   python benchmarks/cpu_cost.py uninet glass --steps 2 --out /tmp/cpu_cost
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(name, steps, out, extra):
    run_dir = out / name
    command = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "src" / "run.py"), f"experiment={name}",
               "backbone.pretrained=false", f"trainer.max_steps={steps}", "trainer.max_epochs=1",
               "evaluation.save_images=false", "evaluation.efficiency=false", "trainer.progress_bar=false",
               f"hydra.run.dir={run_dir}", "overwrite=true", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time .*: ([\d:.]+)", result.stderr)
    record = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return {"model": name, "status": record.get("status", "no record"), "error": record.get("error"),
            "image_size": record.get("run", {}).get("image_size"), "backbone": record.get("run", {}).get("backbone"),
            "fit_s": record.get("timing", {}).get("fit_s"), "test_s": record.get("timing", {}).get("test_s"),
            "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None, "wall": wall.group(1) if wall else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="experiment preset names (conf/experiment/)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (trainer.max_steps)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/defectvad_cpu_cost"))
    parser.add_argument("--override", action="append", default=[], help="an extra override for every run")
    args = parser.parse_args()
    for name in args.models:
        print(json.dumps(measure(name, args.steps, args.out, args.override)), flush=True)


if __name__ == "__main__":
    main()
