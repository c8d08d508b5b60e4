# src/defectvad/data/synthetic_scenes.py
# normal images of the synthetic data set: three textures and three objects on a background
import math

import numpy as np
from PIL import Image

SIZE = 256
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


class Scene:
    def __init__(self, background, foreground, alpha):
        self.background = background
        self.foreground = foreground
        self.alpha = alpha

    def copy(self):
        return Scene(self.background, self.foreground.copy(), self.alpha.copy())

    def compose(self):
        alpha = self.alpha[..., None]
        return self.background * (1 - alpha) + self.foreground * alpha


def smooth_noise(rng, cells):
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC))


def fractal_noise(rng, cells, octaves):
    total = sum(0.5 ** i * smooth_noise(rng, cells * 2 ** i) for i in range(octaves))
    return total / np.float32(1.5)


def rgb(values):
    return np.array(values, dtype=np.float32)


def texture_scene(image):
    return Scene(np.zeros_like(image), image.astype(np.float32), np.ones((SIZE, SIZE), np.float32))


def plain_background(rng, color):
    return rgb(color) * (1 + 0.08 * smooth_noise(rng, 4))[..., None]


def render_weave(rng):
    period = 14.0
    angle = float(rng.uniform(-0.03, 0.03))
    u = (XX * math.cos(angle) + YY * math.sin(angle) + float(rng.uniform(0, 2 * period))) / period
    v = (YY * math.cos(angle) - XX * math.sin(angle) + float(rng.uniform(0, 2 * period))) / period
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    across = np.where(warp_on_top, u % 1, v % 1)
    along = np.where(warp_on_top, v % 1, u % 1)
    bulge = np.sin(np.pi * across) ** 0.7 * (0.75 + 0.25 * np.sin(np.pi * along))
    fibre = 0.05 * smooth_noise(rng, 96) + 0.04 * smooth_noise(rng, 6)
    color = np.where(warp_on_top[..., None], rgb([0.80, 0.71, 0.52]), rgb([0.64, 0.57, 0.43]))
    return texture_scene(color * (0.4 + 0.6 * bulge + fibre)[..., None])


def render_marble(rng):
    turbulence = fractal_noise(rng, 4, 4)
    angle = float(rng.uniform(0.5, 1.1))
    wave = np.sin((XX * math.cos(angle) + YY * math.sin(angle)) / 20 + 2.8 * turbulence)
    vein = (1 - np.abs(wave)) ** 6
    cloud = fractal_noise(rng, 8, 3)
    image = rgb([0.88, 0.87, 0.84]) * (1 + 0.04 * cloud)[..., None] - vein[..., None] * rgb([0.26, 0.25, 0.2])
    return texture_scene(image)


def render_tiles(rng):
    tile, grout = 64.0, 5.0
    x = XX + float(rng.uniform(-3, 3))
    y = YY + float(rng.uniform(-3, 3))
    gx, gy = x % tile, y % tile
    edge = np.minimum(np.minimum(gx, gy), np.minimum(tile - gx, tile - gy))
    on_tile = np.clip(edge - grout / 2 + 0.5, 0, 1)[..., None]
    index_x = np.floor(x / tile).astype(int) + 1
    index_y = np.floor(y / tile).astype(int) + 1
    tile_shift = rng.normal(0, 0.025, (7, 7, 3)).astype(np.float32)[index_y, index_x]
    half = grout / 2

    def near(distance):
        return np.exp(-np.maximum(distance - half, 0) / 3)

    bevel = 0.09 * (near(gx) + near(gy) - near(tile - gx) - near(tile - gy))
    mottle = 0.04 * fractal_noise(rng, 8, 3)
    tiles = (rgb([0.72, 0.42, 0.30]) + tile_shift) * (1 + bevel + mottle)[..., None]
    grout_color = rgb([0.78, 0.76, 0.70]) * (1 + 0.05 * smooth_noise(rng, 64))[..., None]
    return texture_scene(grout_color * (1 - on_tile) + tiles * on_tile)


def render_disc(rng):
    cx, cy = (128 + rng.uniform(-4, 4, 2)).tolist()
    radius = 84 + float(rng.uniform(-1.5, 1.5))
    turn = float(rng.uniform(-0.08, 0.08))
    dx, dy = XX - cx, YY - cy
    r = np.hypot(dx, dy)
    alpha = np.clip(radius - r + 0.5, 0, 1)
    dome = np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1))
    shade = 0.55 + 0.3 * dome - 0.18 * (dx + dy) / (radius * 1.414)
    shade = shade * (1 - 0.45 * np.exp(-((r - 0.7 * radius) / 1.3) ** 2))
    u = dx * math.cos(turn) + dy * math.sin(turn)
    v = dy * math.cos(turn) - dx * math.sin(turn)
    label = np.clip(30.5 - np.abs(u), 0, 1) * np.clip(6.5 - np.abs(v), 0, 1)
    notch = np.clip(6.5 - np.hypot(u, v + 42), 0, 1)
    printed = np.maximum(label, notch)
    grain = 0.03 * smooth_noise(rng, 96)
    face = rgb([0.86, 0.67, 0.28]) * (shade + grain)[..., None]
    face = face * (1 - printed[..., None]) + rgb([0.22, 0.12, 0.06]) * printed[..., None]
    return Scene(plain_background(rng, [0.20, 0.22, 0.25]), face, alpha)


def render_tablet(rng):
    cx, cy = (128 + rng.uniform(-4, 4, 2)).tolist()
    turn = float(rng.uniform(-0.06, 0.06))
    half_length, radius = 64.0, 36.0
    dx, dy = XX - cx, YY - cy
    u = dx * math.cos(turn) + dy * math.sin(turn)
    v = dy * math.cos(turn) - dx * math.sin(turn)
    distance = np.hypot(np.maximum(np.abs(u) - half_length, 0), v)
    alpha = np.clip(radius - distance + 0.5, 0, 1)
    body = np.sqrt(np.clip(1 - (distance / radius) ** 2, 0, 1))
    highlight = 0.22 * np.exp(-((v + 15) / 5) ** 2) * np.clip(half_length + 10 - np.abs(u), 0, 1)
    shade = 0.5 + 0.45 * body + highlight
    side = np.clip(u / 1.5 + 0.5, 0, 1)[..., None]
    color = rgb([0.80, 0.18, 0.16]) * (1 - side) + rgb([0.93, 0.90, 0.82]) * side
    seam = 1 - 0.3 * np.exp(-(u / 1.2) ** 2)
    face = color * (shade * seam + 0.02 * smooth_noise(rng, 64))[..., None]
    return Scene(plain_background(rng, [0.50, 0.55, 0.60]), face, alpha)


def render_gear(rng):
    cx, cy = (128 + rng.uniform(-4, 4, 2)).tolist()
    turn = float(rng.uniform(-0.05, 0.05))
    teeth, outer, root, hole = 12, 92.0, 76.0, 24.0
    dx, dy = XX - cx, YY - cy
    r = np.hypot(dx, dy)
    phase = ((np.arctan2(dy, dx) - turn) * teeth / (2 * np.pi)) % 1
    tooth = np.clip((0.3 - np.abs(phase - 0.5)) / 0.07, 0, 1)
    rim = root + (outer - root) * tooth
    alpha = np.clip(rim - r + 0.5, 0, 1) * np.clip(r - hole + 0.5, 0, 1)
    edge = np.minimum(rim - r, r - hole)
    brushed = 0.035 * np.sin(r * 1.9 + 3 * smooth_noise(rng, 16))
    shade = 0.8 - 0.15 * (dx + dy) / (outer * 1.414) + brushed
    shade = shade * (1 - 0.3 * np.exp(-np.maximum(edge, 0) / 3))
    shade = shade + 0.08 * np.exp(-((r - 40) / 3) ** 2)
    face = rgb([0.66, 0.68, 0.71]) * shade[..., None]
    return Scene(plain_background(rng, [0.16, 0.17, 0.19]), face, alpha)
