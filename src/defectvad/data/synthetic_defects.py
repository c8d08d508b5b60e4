# src/defectvad/data/synthetic_defects.py
# each defect takes a normal Scene and returns a changed copy; the generator derives the mask
import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from defectvad.data.synthetic_scenes import SIZE, XX, YY, rgb, smooth_noise

SUPERSAMPLE = 2
STAIN_COLORS = np.array([[0.12, 0.10, 0.08], [0.62, 0.30, 0.08], [0.15, 0.25, 0.60], [0.96, 0.95, 0.90]],
                        dtype=np.float32)
TINTS = np.array([[1.35, 0.85, 0.50], [0.55, 0.85, 1.45], [0.70, 1.30, 0.70]], dtype=np.float32)


def pick_point(rng, region):
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def interior(scene, margin):
    inside = ndimage.distance_transform_edt(np.pad(scene.alpha > 0.99, 1))[1:-1, 1:-1]
    return inside > margin


def blob_distance(rng, cx, cy, radius, roughness, harmonics):
    dx, dy = XX - cx, YY - cy
    angle = np.arctan2(dy, dx)
    boundary = np.ones_like(angle)
    for k in range(2, harmonics + 1):
        boundary += float(rng.uniform(0, roughness)) * np.cos(k * angle + float(rng.uniform(0, 2 * np.pi)))
    return np.hypot(dx, dy) - radius * boundary


def draw_strokes(strokes):
    canvas = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in strokes:
        scaled = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]
        draw.line(scaled, fill=255, width=int(round(width * SUPERSAMPLE)), joint="curve")
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def blend(scene, amount, target):
    changed = scene.copy()
    amount = (amount * scene.alpha)[..., None]
    changed.foreground = scene.foreground * (1 - amount) + target * amount
    return changed


def add_scratch(scene, rng):
    cx, cy = pick_point(rng, interior(scene, 12))
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(90, 140)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = np.array([cx, cy]) - direction * length / 2
    end = np.array([cx, cy]) + direction * length / 2
    bend = (start + end) / 2 + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
    amount = draw_strokes([(list(map(tuple, curve)), rng.uniform(2.5, 3.5))])
    surface = scene.foreground[int(cy), int(cx)].mean()
    target = scene.foreground * 0.3 if surface > 0.5 else scene.foreground + (1 - scene.foreground) * 0.7
    return blend(scene, amount, target)


def walk(rng, start, heading, steps, step_length):
    points = [start]
    for _ in range(steps):
        heading += rng.normal(0, 0.45)
        x, y = points[-1]
        points.append((x + step_length * np.cos(heading), y + step_length * np.sin(heading)))
    return points


def add_crack(scene, rng):
    cx, cy = pick_point(rng, interior(scene, 20))
    heading = rng.uniform(0, 2 * np.pi)
    steps = int(rng.integers(6, 9))
    main = walk(rng, (cx, cy), heading, steps, 7.0)[::-1] + walk(rng, (cx, cy), heading + np.pi, steps, 7.0)[1:]
    strokes = [(main, rng.uniform(2.5, 3.5))]
    for _ in range(int(rng.integers(2, 4))):
        root = main[int(rng.integers(2, len(main) - 2))]
        side = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1) + np.pi * rng.integers(2)
        strokes.append((walk(rng, root, side, int(rng.integers(3, 6)), 6.0), rng.uniform(1.5, 2.5)))
    return blend(scene, draw_strokes(strokes), scene.foreground * 0.12)


def add_hole(scene, rng):
    cx, cy = pick_point(rng, interior(scene, 20))
    radius = float(rng.uniform(9, 15))
    distance = blob_distance(rng, cx, cy, radius, 0.12, 4)
    inside = np.clip(0.5 - distance, 0, 1)
    rim = np.clip(1 - np.abs(distance - 1.5) / 1.5, 0, 1) * 0.5
    depth = (0.05 + 0.05 * np.clip((YY - cy) / radius, -1, 1))[..., None] * rgb([1.0, 0.95, 0.9])
    lighter = np.clip(scene.foreground * 1.25 + 0.05, 0, 1)
    return blend(blend(scene, rim, lighter), inside, depth)


def add_stain(scene, rng):
    cx, cy = pick_point(rng, interior(scene, 16))
    distance = blob_distance(rng, cx, cy, float(rng.uniform(14, 24)), 0.15, 6)
    amount = np.clip(-distance / 5, 0, 1) * (0.8 + 0.2 * smooth_noise(rng, 12)) * float(rng.uniform(0.65, 0.85))
    local = scene.foreground[int(cy), int(cx)]
    color = STAIN_COLORS[np.argmax(np.abs(STAIN_COLORS - local).sum(axis=1))]
    return blend(scene, np.clip(amount, 0, 1), color)


def shift_color(scene, rng):
    cx, cy = pick_point(rng, interior(scene, 18))
    distance = blob_distance(rng, cx, cy, float(rng.uniform(18, 28)), 0.12, 5)
    amount = np.clip(0.5 - distance / 1.5, 0, 1)
    tint = TINTS[rng.integers(len(TINTS))] * float(rng.uniform(0.85, 1.15))
    return blend(scene, amount, np.clip(scene.foreground * tint, 0, 1))


def cut_missing_piece(scene, rng):
    border = (XX > 30) & (XX < SIZE - 30) & (YY > 30) & (YY < SIZE - 30)
    cx, cy = pick_point(rng, (scene.alpha > 0.3) & (scene.alpha < 0.7) & border)
    distance = blob_distance(rng, cx, cy, float(rng.uniform(15, 22)), 0.08, 8)
    changed = scene.copy()
    changed.alpha = scene.alpha * np.clip(distance + 0.5, 0, 1)
    return changed


DEFECTS = {
    "scratch": add_scratch,
    "crack": add_crack,
    "hole": add_hole,
    "stain": add_stain,
    "color": shift_color,
    "missing": cut_missing_piece,
}
