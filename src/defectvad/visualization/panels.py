# src/defectvad/visualization/panels.py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PREDICTED_COLOR = (255, 255, 255)
TRUTH_COLOR = (0, 255, 0)
MIN_SIDE = 256
CAPTION_HEIGHT = 18
DPI = 100


def to_uint8_image(image):
    # a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
        image = (image * 255 + 0.5).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def draw_outline(axes, region, color, width):
    # the region's border, padded with background so that it closes along the image's edge too
    if not region.any():
        return
    height, width_in_pixels = region.shape
    padded = np.pad(region.astype(np.float32), 1)
    axes.contour(np.arange(-1, width_in_pixels + 1), np.arange(-1, height + 1), padded, levels=[0.5],
                 colors=[np.divide(color, 255)], linewidths=width)


def draw_panel(image, anomaly_map, pixel_threshold, map_range, caption="", mask=None):
    # image | heatmap | overlay with the predicted region (map >= pixel_threshold) outlined in white
    # and, given a mask, the true defect outlined in green; one colour range for the whole run
    image = to_uint8_image(image)
    height, width = image.shape[:2]
    values = np.asarray(anomaly_map, dtype=np.float64).reshape(height, width)
    scale = max(1, -(-MIN_SIDE // max(height, width)))
    tile_width, tile_height = width * scale, height * scale
    figure = Figure(figsize=(3 * tile_width / DPI, (tile_height + CAPTION_HEIGHT) / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    bottom = tile_height / (tile_height + CAPTION_HEIGHT)
    tiles = [figure.add_axes((index / 3, 0, 1 / 3, bottom)) for index in range(3)]
    heat = {"cmap": "jet", "vmin": map_range[0], "vmax": map_range[1], "interpolation": "nearest"}
    tiles[0].imshow(image, interpolation="nearest")
    tiles[1].imshow(values, **heat)
    tiles[2].imshow(image, interpolation="nearest")
    tiles[2].imshow(values, alpha=0.5, **heat)
    line_width = max(1, tile_width // 128) * 72 / DPI  # pixels to points
    if mask is not None:
        draw_outline(tiles[2], np.asarray(mask).reshape(height, width) > 0, TRUTH_COLOR, line_width)
    draw_outline(tiles[2], values >= pixel_threshold, PREDICTED_COLOR, line_width)
    for tile in tiles:
        tile.set_axis_off()
        tile.set_xlim(-0.5, width - 0.5)
        tile.set_ylim(height - 0.5, -0.5)
    figure.text(4 / (3 * tile_width), 1 - 3 / (tile_height + CAPTION_HEIGHT), caption, ha="left", va="top",
                fontsize=9)
    return figure


def describe(name, score, threshold, kind):
    verdict = "anomalous" if score >= threshold else "normal"
    sign = ">=" if score >= threshold else "<"
    return f"{name}  score {score:.4g} {sign} {threshold:.4g} ({kind}): {verdict}"
