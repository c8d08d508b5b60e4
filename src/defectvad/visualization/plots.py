# src/defectvad/visualization/plots.py
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, roc_curve

NORMAL_COLOR = "tab:blue"
ANOMALOUS_COLOR = "tab:red"
THRESHOLD_STYLES = ("--", ":", "-.")
DPI = 100


def create_figure(width, height):
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def draw_roc_curve(scores, labels, title="ROC curve"):
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    figure = create_figure(440, 440)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.6", linewidth=1)
    if labels.size and labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        axes.plot(fpr, tpr, color=ANOMALOUS_COLOR, linewidth=2, clip_on=False)  # visible along the frame too
        title = f"{title}, AUROC {auc(fpr, tpr):.3f}"
    else:
        axes.text(0.5, 0.5, "needs normal and anomalous images", ha="center", va="center")
    axes.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=title, xlabel="false positive rate",
             ylabel="true positive rate")
    axes.grid(color="0.9")
    return figure


def draw_score_histogram(scores, labels, thresholds=(), bins=30, title="test image scores"):
    # normal and anomalous images' scores as two translucent histograms; thresholds: (name, value) lines
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    lines = [(name, value) for name, value in thresholds if value is not None and math.isfinite(value)]
    low = min([scores.min()] + [value for _, value in lines])
    high = max([scores.max()] + [value for _, value in lines])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    figure = create_figure(600, 380)
    axes = figure.add_subplot()
    for label, name, color in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALOUS_COLOR)):
        chosen = scores[labels == label]
        axes.hist(chosen, edges, color=color, alpha=0.5, edgecolor=color, label=f"{name} ({chosen.size})")
    for index, (name, value) in enumerate(lines):
        axes.axvline(value, color="black", linewidth=1, linestyle=THRESHOLD_STYLES[index % len(THRESHOLD_STYLES)],
                     label=f"threshold {name} {value:.4g}")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=title, xlabel="image score", ylabel="images")
    axes.legend(fontsize="small")
    return figure
