# src/defectvad/visualization/region_boxes.py
# graded regions on a panel's overlay: each region's box and its level and type above it
from matplotlib.patches import Rectangle

BOX_COLOR = "yellow"


def draw_region_boxes(figure, regions, overlay_index=2):
    axes = figure.axes[overlay_index]
    for region in regions:
        x_min, y_min, x_max, y_max = region["bbox"]
        axes.add_patch(Rectangle((x_min - 0.5, y_min - 0.5), x_max - x_min + 1, y_max - y_min + 1, fill=False,
                                 edgecolor=BOX_COLOR, linewidth=1))
        label = f"L{region['level']}" + (f" {region['type']}" if region.get("type") else "")
        axes.text(x_min - 0.5, y_min - 1.5, label, color=BOX_COLOR, fontsize=7, ha="left", va="bottom",
                  clip_on=True)
    return figure


def describe_grade(level, defect_type):
    if level == 0:
        return "no defect region"
    return f"level {level}" + (f" {defect_type}" if defect_type else "")
