# src/defectvad/data/panel_generator.py
import csv
import io
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from defectvad.data.generated_sets import generate_categories
from defectvad.data.panel_defects import DEFECTS
from defectvad.data.panel_scenes import CELLS, add_sensor_noise, render_emission, render_optics
from defectvad.data.panel_severity import LEVELS, jnd_contrast, severity_index, severity_level
from defectvad.errors import DatasetError

# raise it whenever a change alters a written file: trees of another version are refused
GENERATOR_VERSION = 1
STAMP = "panel_generator.json"
PANEL_CATEGORIES = tuple(CELLS)
DEFECT_TYPES = tuple(DEFECTS)
TRAIN_COUNT, TEST_GOOD_COUNT = 40, 10
# severity indices drawn for each level (log-uniform), inside the level's cut-points
INDEX_RANGES = {1: (0.5, 1.0), 2: (1.0, 2.0), 3: (2.0, 4.0), 4: (4.0, 8.0), 5: (8.0, 16.0)}
# the emission of a defect's core changes by at most this share: brighter +60 %, darker -95 %
MAX_GAIN = {1.0: 0.6, -1.0: 0.95}
COLOURS = {(1.0, 1.0, 1.0): "neutral", (1.0, 0.0, 0.0): "red", (0.0, 1.0, 0.0): "green", (0.0, 0.0, 1.0): "blue"}
CSV_COLUMNS = ("image", "mask", "type", "level", "severity_index", "jnd_pct", "contrast_pct", "area_px",
               "bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max", "centroid_x", "centroid_y",
               "polarity", "colour", "shape")


def measure_defect(clean, image, mask):
    # contrast: the Weber contrast of the most changed channel, averaged over the mask, in percent
    change = (np.abs(image.astype(np.float64) - clean) / clean).max(axis=2)
    ys, xs = np.nonzero(mask)
    contrast = 100 * float(change[mask].mean())
    area = int(mask.sum())
    return {"level": severity_level(contrast, area), "severity_index": float(severity_index(contrast, area)),
            "jnd_pct": float(jnd_contrast(area)), "contrast_pct": contrast, "area_px": area,
            "bbox_x_min": int(xs.min()), "bbox_y_min": int(ys.min()), "bbox_x_max": int(xs.max()),
            "bbox_y_max": int(ys.max()), "centroid_x": float(xs.mean()), "centroid_y": float(ys.mean())}


def add_defect(rng, emission, optics, clean, defect_type, level, cell):
    for _ in range(100):
        amount, colour, sign, shape = DEFECTS[defect_type](rng, cell)
        mask = amount >= 0.5
        if not mask.any():
            continue
        mean_amount = float(amount[mask].mean())
        jnd = float(jnd_contrast(int(mask.sum())))
        low, high = INDEX_RANGES[level]
        high = min(high, 100 * MAX_GAIN[sign] * mean_amount / jnd)
        if high <= low * 1.05:
            continue
        index = math.exp(rng.uniform(math.log(low * 1.01), math.log(high * 0.99)))
        gain = sign * index * jnd / (100 * mean_amount)
        image = np.clip(emission * (1 + gain * amount[..., None] * colour) * optics, 0, 1)
        record = measure_defect(clean, image, mask)
        if record["level"] == level:
            polarity = "bright" if sign > 0 else "dark"
            record.update(polarity=polarity, colour=COLOURS.get(tuple(colour.tolist()), "tinted"), shape=shape)
            return image, mask, record
    raise RuntimeError(f"no {defect_type} of level {level} fits a {cell}-pixel grid")


def render_sample(category, split, defect_type, index, seed=0):
    # one stream per image, so files do not depend on each other or on the order of writing
    codes = [zlib.crc32(category.encode()), zlib.crc32(f"{split}/{defect_type}".encode())]
    rng = np.random.default_rng([seed, *codes, index])
    emission = render_emission(rng, category)
    optics = render_optics(rng, category)
    clean = np.clip(emission * optics, 0, 1)
    sample = {"clean": clean, "defective": clean, "mask": None, "record": None}
    if defect_type != "good":
        level = LEVELS[index % len(LEVELS)]
        image, mask, record = add_defect(rng, emission, optics, clean, defect_type, level, CELLS[category])
        sample.update(defective=image, mask=mask, record={"type": defect_type, **record})
    sample["image"] = add_sensor_noise(rng, sample["defective"])
    return sample


def plan_images():
    jobs = [("train", "good", i) for i in range(TRAIN_COUNT)]
    jobs += [("test", "good", i) for i in range(TEST_GOOD_COUNT)]
    return jobs + [("test", t, i) for t in DEFECT_TYPES for i in range(len(LEVELS))]


def write_png(array, path):
    Image.fromarray(array).save(path, compress_level=1)


def write_image(folder, category, seed, job):
    split, defect_type, index = job
    sample = render_sample(category, split, defect_type, index, seed)
    image_name = f"{split}/{defect_type}/{index:03d}.png"
    write_png(sample["image"], folder / image_name)
    if sample["mask"] is None:
        return None
    mask_name = f"ground_truth/{defect_type}/{index:03d}_mask.png"
    write_png(sample["mask"].astype(np.uint8) * 255, folder / mask_name)
    return {"image": image_name, "mask": mask_name, **sample["record"]}


def format_row(record):
    return [f"{record[c]:.4f}" if isinstance(record[c], float) else record[c] for c in CSV_COLUMNS]


def write_category(folder, category, seed):
    jobs = plan_images()
    for split, defect_type, _ in jobs:
        (folder / split / defect_type).mkdir(parents=True, exist_ok=True)
        if defect_type != "good":
            (folder / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
    # numpy and PIL release the GIL, so threads share the work
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        records = [r for r in pool.map(lambda job: write_image(folder, category, seed, job), jobs) if r]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(format_row(r) for r in sorted(records, key=lambda r: r["image"]))
    (folder / "defects.csv").write_text(text.getvalue())
    stamp = {"generator": "defectvad panel", "version": GENERATOR_VERSION, "seed": seed, "category": category}
    (folder / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")


def check_stamp(folder, seed):
    remedy = f"delete it (rm -r {folder}) and it is written again on first use, or point dataset.root elsewhere"
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{folder} exists but has no readable {STAMP}, so it was not written by the panel "
                           f"generator; {remedy}") from None
    if stamp.get("version") != GENERATOR_VERSION or stamp.get("seed") != seed:
        raise DatasetError(f"{folder} was written by panel generator version {stamp.get('version')} with seed "
                           f"{stamp.get('seed')}; this is version {GENERATOR_VERSION} with seed {seed}: {remedy}")


def generate_panel_dataset(root, categories=None, seed=0):
    for name in generate_categories(root, categories, PANEL_CATEGORIES, "panel", write_category, seed):
        check_stamp(Path(root) / name, seed)
    return Path(root)


def read_defects(category_dir):
    with open(Path(category_dir) / "defects.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key in ("level", "area_px") or key.startswith("bbox_"):
                row[key] = int(value)
            elif key in ("severity_index", "jnd_pct", "contrast_pct", "centroid_x", "centroid_y"):
                row[key] = float(value)
    return rows
