# benchmarks/tiling.py
# tiled PatchCore on large images with small defects, beside the same model on images resized to 256, both judged
# at full resolution, with the peak RSS of each run, and the tiled run again with twice the test images (its memory
# must not grow with them). Writes a folder data set of size x size images, runs src/run.py, prints a table.
#   python benchmarks/tiling.py --size 2048 --train 4 --test 8 --backbone resnet18
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder, size, train, test, seed=0):
    # a slowly varying grey surface with sensor noise; defects are small dark or bright blobs of 4 to 16 pixels
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size] / size

    def surface():
        shade = 120 + 20 * np.sin(2 * np.pi * (rows * rng.uniform(0.5, 1.5) + columns * rng.uniform(0.5, 1.5)))
        return shade[..., None] + rng.normal(0, 4, (size, size, 3))

    def save(path, array, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode).save(path)

    for index in range(train):
        save(folder / "good" / f"train_{index:03d}.png", surface())
    for index in range(test):
        save(folder / "good" / f"test_{index:03d}.png", surface())
        image, mask = surface(), np.zeros((size, size), np.uint8)
        for _ in range(3):
            radius = rng.integers(2, 8)
            top, left = rng.integers(radius, size - radius, 2)
            blob = (rows * size - top) ** 2 + (columns * size - left) ** 2 <= radius ** 2
            image[blob] += rng.choice([-1, 1]) * 60
            mask[blob] = 255
        save(folder / "defect" / f"{index:03d}.png", image)
        save(folder / "mask" / f"{index:03d}.png", mask, "L")


def run(name, data, out, extra, ratio):
    command = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "src" / "run.py"), "model=patchcore",
               "dataset=folder", f"dataset.root={data}", "dataset.normal_dir=good", f"dataset.normal_test_ratio={ratio}",
               "dataset.abnormal_dir=defect", "dataset.mask_dir=mask", "evaluation.full_resolution=true",
               "evaluation.save_images=false", "evaluation.efficiency=false", "loader.train_batch_size=8",
               f"hydra.run.dir={out / name}", "overwrite=true", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    record = json.loads((out / name / "metrics.json").read_text())
    if record["status"] != "ok":
        raise SystemExit(f"{name}: {record.get('error')}")
    return {"run": name, **{key: round(record["metrics"][key], 4) for key in ("image_auroc", "pixel_auroc", "aupro")},
            "fit_s": record["timing"]["fit_s"], "test_s": record["timing"]["test_s"],
            "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--work", default="/tmp/defectvad_tiling")
    args = parser.parse_args()
    work = Path(args.work)
    common = [f"backbone={args.backbone}", "backbone.pretrained=false", "model.coreset_sampling_ratio=0.01"]
    tiled = ["transform.image_size=[%d,%d]" % (args.size, args.size), "tiling.tile_size=256", "tiling.stride=224"]
    rows = []
    for test in (args.test, 2 * args.test):
        data = work / f"data_{test}"
        if not data.exists():
            write_images(data, args.size, args.train, test)
        # the folder data set holds out this share of the normal images for the test split
        ratio = test / (args.train + test)
        rows.append(run(f"tiled_{test}", data, work / "runs", common + tiled, ratio) | {"test_images": 2 * test})
        if test == args.test:
            rows.append(run(f"resized_{test}", data, work / "runs", common, ratio) | {"test_images": 2 * test})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
