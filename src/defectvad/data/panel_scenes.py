# src/defectvad/data/panel_scenes.py
# a camera's view of a display panel showing one grey: the panel's emission (slowly varying luminance and
# colour) times the optics (sub-pixel pattern, vignetting); defects change the emission only
import math

import numpy as np
from PIL import Image

SIZE = 256
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
# image pixels per panel pixel, the grid that line and pixel defects follow
CELLS = {"plain": 2, "stripe": 3}
BASE_LEVELS = {"plain": 0.45, "stripe": 0.36}
STRIPE_DEPTH = 0.25
BLACK_MATRIX = 0.7


def smooth_field(rng, cells):
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC))


def render_emission(rng, category):
    level = BASE_LEVELS[category] * (1 + float(rng.normal(0, 0.01)))
    cast = 1 + rng.normal(0, 0.01, 3).astype(np.float32)
    angle = float(rng.uniform(0, 2 * np.pi))
    ramp = float(rng.uniform(0, 0.02)) * ((XX - SIZE / 2) * math.cos(angle) + (YY - SIZE / 2) * math.sin(angle)) / SIZE
    backlight = 1 + 0.012 * smooth_field(rng, 2) + ramp
    drift = 1 + 0.004 * np.stack([smooth_field(rng, 2) for _ in range(3)], axis=-1)
    return (level * cast * backlight[..., None] * drift).astype(np.float32)


def render_stripes():
    # columns R, G, B of each panel pixel, its third row dimmed by the black matrix; every channel's mean is 1
    lit = np.eye(3, dtype=np.float32)[(XX % 3).astype(int)]
    columns = 1 + STRIPE_DEPTH * (3 * lit - 1)
    rows = np.where((YY % 3 == 2)[..., None], BLACK_MATRIX, 1.0) / ((2 + BLACK_MATRIX) / 3)
    return (columns * rows).astype(np.float32)


def render_optics(rng, category):
    cx, cy = (SIZE / 2 + rng.normal(0, 6, 2)).tolist()
    strength = float(rng.uniform(0.10, 0.16))
    vignette = 1 - strength * ((XX - cx) ** 2 + (YY - cy) ** 2) / (SIZE ** 2 / 2)
    pattern = render_stripes() if category == "stripe" else np.ones((SIZE, SIZE, 3), np.float32)
    return (pattern * vignette[..., None]).astype(np.float32)


def add_sensor_noise(rng, image):
    # read noise and shot noise, then 8 bits
    sigma = np.sqrt(0.004 ** 2 + 1e-4 * np.clip(image, 0, 1))
    noisy = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(noisy * 255 + 0.5, 0, 255).astype(np.uint8)
