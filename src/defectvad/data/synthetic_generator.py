# src/defectvad/data/synthetic_generator.py
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from defectvad.data.generated_sets import generate_categories
from defectvad.data.synthetic_defects import DEFECTS
from defectvad.data.synthetic_scenes import (SIZE, XX, YY, render_disc, render_gear, render_marble,
                                             render_tablet, render_tiles, render_weave)

CATEGORY_SPECS = {
    "tiles": (render_tiles, ("crack", "hole", "stain", "color")),
    "weave": (render_weave, ("scratch", "hole", "stain", "color")),
    "marble": (render_marble, ("crack", "hole", "stain", "color")),
    "disc": (render_disc, ("scratch", "missing", "stain", "color")),
    "tablet": (render_tablet, ("crack", "missing", "stain", "hole")),
    "gear": (render_gear, ("missing", "scratch", "hole", "color")),
}
SYNTHETIC_CATEGORIES = tuple(CATEGORY_SPECS)
TRAIN_COUNT, TEST_GOOD_COUNT, DEFECTS_PER_TYPE = 40, 10, 5
CHANGE_THRESHOLD = 0.08
MIN_DEFECT_PIXELS = 250


def draw_lighting(rng):
    angle = float(rng.uniform(0, 2 * np.pi))
    ramp = float(rng.uniform(0, 0.08)) * ((XX - SIZE / 2) * math.cos(angle) + (YY - SIZE / 2) * math.sin(angle)) / SIZE
    gain = (rng.uniform(0.95, 1.05) * (1 + rng.uniform(-0.02, 0.02, 3))).astype(np.float32)
    return (1 + ramp)[..., None] * gain


def quantize(image):
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def render_image(render, defect, rng):
    scene = render(rng)
    lighting = draw_lighting(rng)
    clean = scene.compose() * lighting
    mask = None
    image = clean
    if defect is not None:
        for _ in range(20):
            image = defect(scene, rng).compose() * lighting
            mask = np.abs(image - clean).max(axis=2) > CHANGE_THRESHOLD
            if mask.sum() >= MIN_DEFECT_PIXELS:
                break
    noise = rng.normal(0, 0.012, image.shape).astype(np.float32)
    return quantize(image + noise), mask


def write_png(array, path):
    Image.fromarray(array).save(path, compress_level=1)


def write_image(folder, name, seed, job):
    render, _ = CATEGORY_SPECS[name]
    split, defect_type, index = job
    # one stream per image, so files do not depend on each other or on the order of writing
    codes = [zlib.crc32(name.encode()), zlib.crc32(f"{split}/{defect_type}".encode())]
    rng = np.random.default_rng([seed, *codes, index])
    defect = DEFECTS.get(defect_type) if split == "test" else None
    image, mask = render_image(render, defect, rng)
    write_png(image, folder / split / defect_type / f"{index:03d}.png")
    if mask is not None:
        write_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect_type / f"{index:03d}_mask.png")


def write_category(folder, name, seed):
    _, defect_types = CATEGORY_SPECS[name]
    jobs = [("train", "good", i) for i in range(TRAIN_COUNT)]
    jobs += [("test", "good", i) for i in range(TEST_GOOD_COUNT)]
    jobs += [("test", t, i) for t in defect_types for i in range(DEFECTS_PER_TYPE)]
    for split, defect_type, _ in jobs:
        (folder / split / defect_type).mkdir(parents=True, exist_ok=True)
    for defect_type in defect_types:
        (folder / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
    # numpy and zlib release the GIL, so threads share the work
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: write_image(folder, name, seed, job), jobs))


def generate_synthetic_dataset(root, categories=None, seed=0):
    generate_categories(root, categories, SYNTHETIC_CATEGORIES, "synthetic", write_category, seed)
    return Path(root)
