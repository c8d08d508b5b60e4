# src/defectvad/data/panel_defects.py
# each defect draws a shape: an amount map a in [0, 1] (its mask is a >= 0.5), a colour (largest entry 1),
# a sign (+1 brighter, -1 darker) and a name; the generator scales it to the contrast of its severity level
import math

import numpy as np
from PIL import Image, ImageDraw

from defectvad.data.panel_scenes import SIZE, XX, YY

SUPERSAMPLE = 4
NEUTRAL = np.ones(3, np.float32)


def pick_colour(rng, tinted_share):
    if rng.uniform() >= tinted_share:
        return NEUTRAL
    return np.eye(3, dtype=np.float32)[rng.integers(3)] * 0.6 + 0.4


def pick_channel(rng):
    return np.eye(3, dtype=np.float32)[rng.integers(3)]


def rotate(cx, cy, angle):
    dx, dy = XX - cx, YY - cy
    return dx * math.cos(angle) + dy * math.sin(angle), dy * math.cos(angle) - dx * math.sin(angle)


def draw_mura(rng, cell):
    margin = 40
    cx, cy = rng.uniform(margin, SIZE - margin, 2).tolist()
    if rng.uniform() < 0.65:
        radius = float(rng.uniform(12, 26))
        u, v = rotate(cx, cy, float(rng.uniform(0, np.pi)))
        v = v / float(rng.uniform(0.6, 1.0))
        angle = np.arctan2(v, u)
        boundary = 1 + sum(float(rng.uniform(0, 0.08)) * np.cos(k * angle + float(rng.uniform(0, 2 * np.pi)))
                           for k in (2, 3))
        distance = np.hypot(u, v) / (radius * boundary)
        amount, name = 1 / (1 + distance ** 4), "blob"
    else:
        half_width = float(rng.uniform(3, 7))
        half_length = float(rng.uniform(40, 100))
        vertical = rng.uniform() < 0.5
        u, v = rotate(cx, cy, float(rng.uniform(-0.05, 0.05)) + (np.pi / 2 if vertical else 0))
        ends = 1 / (1 + np.exp(np.clip((np.abs(u) - half_length) / 6, -50, 50)))
        amount = ends / (1 + (v / half_width) ** 4)
        name = "band"
    return amount.astype(np.float32), pick_colour(rng, 0.3), float(rng.choice([-1, 1])), name


def draw_line(rng, cell):
    vertical = rng.uniform() < 0.5
    across = cell * int(rng.integers(SIZE // cell // 8, SIZE // cell * 7 // 8))
    length = SIZE if rng.uniform() < 0.5 else int(rng.uniform(0.4, 0.9) * SIZE)
    start = 0 if rng.uniform() < 0.5 else SIZE - length
    amount = np.zeros((SIZE, SIZE), np.float32)
    amount[across:across + cell, start:start + length] = 1
    if vertical:
        amount = amount.T.copy()
    colour = pick_channel(rng) if rng.uniform() < 0.4 else NEUTRAL
    sign = -1.0 if rng.uniform() < 0.6 else 1.0
    return amount, colour, sign, "column" if vertical else "row"


def draw_cluster(rng, cell, size):
    # neighbouring panel pixels, grown one at a time from a random one
    grid = SIZE // cell
    cells = [tuple(rng.integers(grid // 8, grid * 7 // 8, 2).tolist())]
    while len(cells) < size:
        x, y = cells[int(rng.integers(len(cells)))]
        dx, dy = ((1, 0), (-1, 0), (0, 1), (0, -1))[int(rng.integers(4))]
        if (x + dx, y + dy) not in cells:
            cells.append((x + dx, y + dy))
    amount = np.zeros((SIZE, SIZE), np.float32)
    for x, y in cells:
        amount[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = 1
    return amount


def draw_dead_pixel(rng, cell):
    size = int(rng.integers(1, 6))
    return draw_cluster(rng, cell, size), NEUTRAL, -1.0, f"{size}px"


def draw_stuck_pixel(rng, cell):
    size = int(rng.integers(1, 4))
    colour = pick_channel(rng) if rng.uniform() < 0.6 else NEUTRAL
    return draw_cluster(rng, cell, size), colour, 1.0, f"{size}px"


def draw_scratch(rng, cell):
    cx, cy = rng.uniform(40, SIZE - 40, 2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(30, 140)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start, end = np.array([cx, cy]) - direction * length / 2, np.array([cx, cy]) + direction * length / 2
    bend = (start + end) / 2 + normal * rng.uniform(-0.2, 0.2) * length
    t = np.linspace(0, 1, 32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
    canvas = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    width = int(round(rng.uniform(1.2, 2.2) * SUPERSAMPLE))
    ImageDraw.Draw(canvas).line([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in curve], fill=255, width=width,
                                joint="curve")
    amount = np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255
    sign = 1.0 if rng.uniform() < 0.6 else -1.0
    return amount, NEUTRAL, sign, "curve"


def draw_particle(rng, cell):
    cx, cy = rng.uniform(20, SIZE - 20, 2).tolist()
    radius = float(rng.uniform(1.5, 4.5))
    angle = np.arctan2(YY - cy, XX - cx)
    boundary = 1 + sum(float(rng.uniform(0, 0.2)) * np.cos(k * angle + float(rng.uniform(0, 2 * np.pi)))
                       for k in (2, 3, 4))
    distance = np.hypot(XX - cx, YY - cy) - radius * boundary
    amount = 1 / (1 + np.exp(np.clip(distance / 0.6, -50, 50)))
    return amount.astype(np.float32), NEUTRAL, -1.0, "dust"


DEFECTS = {
    "mura": draw_mura,
    "line": draw_line,
    "dead_pixel": draw_dead_pixel,
    "stuck_pixel": draw_stuck_pixel,
    "scratch": draw_scratch,
    "particle": draw_particle,
}
