# src/defectvad/visualization/panels.py
import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from defectvad.visualization.colormaps import colorize

PREDICTED_COLOR = (255, 255, 255)
TRUTH_COLOR = (0, 255, 0)
MIN_SIDE = 256
CAPTION_HEIGHT = 18


def to_uint8_image(image):
    # a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
        image = (image * 255 + 0.5).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def outline(region, width):
    # the border pixels of a boolean region, `width` pixels wide, as an L image
    mask = Image.fromarray(np.asarray(region, dtype=np.uint8) * 255)
    border = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(3)))
    for _ in range(width - 1):
        border = border.filter(ImageFilter.MaxFilter(3))
    return border


def draw_panel(image, anomaly_map, pixel_threshold, map_range, caption="", mask=None):
    # image | heatmap | overlay with the predicted region (map >= pixel_threshold) outlined in white
    # and, given a mask, the true defect outlined in green
    image = to_uint8_image(image)
    values = np.asarray(anomaly_map, dtype=np.float64).reshape(image.shape[:2])
    heat = colorize(values, *map_range)
    blend = (0.5 * image + 0.5 * heat + 0.5).astype(np.uint8)
    scale = max(1, -(-MIN_SIDE // max(image.shape[:2])))
    size = (image.shape[1] * scale, image.shape[0] * scale)
    tiles = [Image.fromarray(array).resize(size, Image.NEAREST) for array in (image, heat, blend)]
    width = max(1, size[0] // 128)
    overlay = tiles[2]
    if mask is not None and np.any(mask):
        truth = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.NEAREST)
        overlay.paste(TRUTH_COLOR, mask=outline(np.asarray(truth) > 0, width))
    predicted = Image.fromarray((values >= pixel_threshold).astype(np.uint8) * 255).resize(size, Image.NEAREST)
    overlay.paste(PREDICTED_COLOR, mask=outline(np.asarray(predicted) > 0, width))

    panel = Image.new("RGB", (3 * size[0], size[1] + CAPTION_HEIGHT), (255, 255, 255))
    for index, tile in enumerate(tiles):
        panel.paste(tile, (index * size[0], CAPTION_HEIGHT))
    ImageDraw.Draw(panel).text((4, 3), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=12))
    return panel


def describe(name, score, threshold, kind):
    verdict = "anomalous" if score >= threshold else "normal"
    sign = ">=" if score >= threshold else "<"
    return f"{name}  score {score:.4g} {sign} {threshold:.4g} ({kind}): {verdict}"
