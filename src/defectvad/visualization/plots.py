# src/defectvad/visualization/plots.py
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NORMAL_COLOR = (31, 119, 180)
ANOMALOUS_COLOR = (214, 39, 40)
AXIS_COLOR = (0, 0, 0)
GRID_COLOR = (225, 225, 225)


class Axes:
    # a plot area inside a white canvas; data coordinates -> pixels
    def __init__(self, size, x_range, y_range, margins=(60, 44, 20, 50)):
        self.image = Image.new("RGB", size, (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(size=12)
        left, top, right, bottom = margins
        self.box = (left, top, size[0] - right, size[1] - bottom)
        self.x_range, self.y_range = x_range, y_range

    def point(self, x, y):
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = left + (x - x0) / ((x1 - x0) or 1) * (right - left)
        py = bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)
        return px, py

    def text(self, xy, text, anchor="la", fill=AXIS_COLOR):
        self.draw.text(xy, text, fill=fill, font=self.font, anchor=anchor)

    def frame(self, title, x_label, y_label, x_ticks, y_ticks):
        left, top, right, bottom = self.box
        for value in x_ticks:
            x, _ = self.point(value, self.y_range[0])
            self.draw.line([(x, top), (x, bottom)], fill=GRID_COLOR)
            self.text((x, bottom + 4), format_tick(value), "ma")
        for value in y_ticks:
            _, y = self.point(self.x_range[0], value)
            self.draw.line([(left, y), (right, y)], fill=GRID_COLOR)
            self.text((left - 4, y), format_tick(value), "rm")
        self.draw.rectangle(self.box, outline=AXIS_COLOR)
        self.text(((left + right) / 2, bottom + 22), x_label, "ma")
        self.text((left, top - 6), y_label, "ld")
        self.text((left, 6), title, "la")


def format_tick(value):
    return f"{value:.3g}"


def nice_ticks(low, high, count=5):
    if not high > low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def roc_points(scores, labels):
    # false and true positive rates at every distinct score, from the highest down; (0, 0) first
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    ends = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps, fps = np.cumsum(labels)[ends], np.cumsum(1 - labels)[ends]
    return np.r_[0, fps / max(1, fps[-1])], np.r_[0, tps / max(1, tps[-1])]


def draw_roc_curve(scores, labels, title="ROC curve"):
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    axes = Axes((440, 440), (0, 1), (0, 1))
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    both = labels.size and labels.min() != labels.max()
    if both:
        fpr, tpr = roc_points(scores, labels)
        title = f"{title}, AUROC {np.trapezoid(tpr, fpr):.3f}"
    axes.frame(title, "false positive rate", "true positive rate", ticks, ticks)
    axes.draw.line([axes.point(0, 0), axes.point(1, 1)], fill=(160, 160, 160))
    if not both:
        axes.text(axes.point(0.5, 0.5), "needs normal and anomalous images", "mm")
        return axes.image
    axes.draw.line([axes.point(x, y) for x, y in zip(fpr, tpr)], fill=ANOMALOUS_COLOR, width=2)
    return axes.image


def draw_score_histogram(scores, labels, thresholds=(), bins=30, title="test image scores"):
    # normal and anomalous images' scores as two translucent histograms; thresholds: (name, value) lines
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    lines = [(name, value) for name, value in thresholds if value is not None and math.isfinite(value)]
    low = min([scores.min()] + [value for _, value in lines])
    high = max([scores.max()] + [value for _, value in lines])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    counts = [np.histogram(scores[labels == label], edges)[0] for label in (0, 1)]
    top = max(1, max(int(c.max(initial=0)) for c in counts))
    axes = Axes((600, 380), (low, high), (0, top * 1.1), margins=(50, 44, 20, 50))
    axes.frame(title, "image score", "images", nice_ticks(low, high), nice_ticks(0, top))
    layer = Image.new("RGBA", axes.image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for count, color in zip(counts, (NORMAL_COLOR, ANOMALOUS_COLOR)):
        for left, right, n in zip(edges[:-1], edges[1:], count):
            if n:
                draw.rectangle([axes.point(left, n), axes.point(right, 0)], fill=color + (120,), outline=color + (255,))
    axes.image = Image.alpha_composite(axes.image.convert("RGBA"), layer).convert("RGB")
    axes.draw = ImageDraw.Draw(axes.image)
    middle = (axes.box[0] + axes.box[2]) / 2
    for index, (name, value) in enumerate(lines):
        x, _ = axes.point(value, 0)
        axes.draw.line([(x, axes.box[1]), (x, axes.box[3])], fill=AXIS_COLOR, width=1)
        # the label on the side of the line with more room
        label_x, anchor = (x + 4, "la") if x < middle else (x - 4, "ra")
        axes.text((label_x, axes.box[1] + 4 + 14 * index), f"threshold {name} {value:.4g}", anchor)
    legend = [("normal", NORMAL_COLOR, int((labels == 0).sum())),
              ("anomalous", ANOMALOUS_COLOR, int((labels == 1).sum()))]
    x = axes.box[2]
    for name, color, n in reversed(legend):
        text = f"{name} ({n})"
        x -= axes.draw.textlength(text, font=axes.font) + 30
        axes.draw.rectangle([x, 14, x + 10, 24], fill=color)
        axes.text((x + 14, 13), text)
    return axes.image
